"""Run by tests/test_distributed.py under torchrun, 2 CPU processes (gloo). Each rank writes OUT/rank<r>.json.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py CONFIG.yaml BAD_ROWS.jsonl OUT

Checks, each against the single-process function run on the same rank:
- prepare_split_shared (rows split over the ranks) == prepare_split, also with bad rows (skip and error);
- sharded_map returns items in row order;
- generate_answers_sharded with a plain model (DDP's case) == generate_answers;
- FSDP2 (torch fully_shard on the CPU): after one training step on the sharded model, the gathered full
  state dict and the adapter saved from it equal the same step taken on an unsharded copy, and generation
  with the sharded model (ranks with different row counts) equals generation with that copy.
"""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(cfg_path: str, bad_rows: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers.distributed.fsdp import is_fsdp_managed_module

    from vlm_tune.config import build_config, load_config
    from vlm_tune.data.collate import ChatCollator
    from vlm_tune.data.sources import load_split, prepare_split
    from vlm_tune.distributed import (
        full_state_dict,
        generate_answers_sharded,
        prepare_split_shared,
        sharded_map,
    )
    from vlm_tune.errors import UserError
    from vlm_tune.evaluate import generate_answers
    from vlm_tune.model import load_model, load_processor, resolve_model_path, setup_training

    cfg = load_config(cfg_path)
    result: dict = {}
    path = resolve_model_path(cfg)
    processor = load_processor(path, cfg)
    collator = ChatCollator(processor, cfg.prompt.system, cfg.prompt.user_template, cfg.train.max_length)

    # pre-flight: shared == single, for good data and for data with bad rows
    rowset = load_split(cfg.data, "train", cfg.model.cache_dir)
    args = ("error", "error", cfg.train.max_length, processor, collator)
    shared = prepare_split_shared(rowset, *args, limit=11)
    single = prepare_split(rowset, *args, limit=11)
    result["preflight_equal"] = (shared.indices, shared.tokens) == (single.indices, single.tokens)
    result["preflight_n"] = len(shared.indices)
    bad_cfg = build_config(
        {"data": {"source": bad_rows, "columns": {"image": "image", "question": "q", "answer": "a"}}}
    )
    bad = load_split(bad_cfg.data, "train", cfg.model.cache_dir)
    s_skip = prepare_split_shared(bad, "skip", "skip")
    o_skip = prepare_split(bad, "skip", "skip")
    result["bad_skip_equal"] = (s_skip.indices, dict(s_skip.skipped)) == (
        o_skip.indices,
        dict(o_skip.skipped),
    )
    result["bad_skip"] = [s_skip.indices, dict(s_skip.skipped)]
    errors = []
    for fn in (prepare_split_shared, prepare_split):
        try:
            fn(bad, "error", "error")
            errors.append(None)
        except UserError as err:
            errors.append(str(err))
    result["bad_error"] = errors

    # sharded_map keeps row order (5 rows over 2 ranks: 3 and 2)
    rows = [rowset.row(i) for i in range(5)]
    result["order"] = sharded_map(lambda part: [r["id"] for r in part], rows) == [r["id"] for r in rows]

    # generation with a plain model on every rank (DDP's case)
    torch.manual_seed(0)
    model = setup_training(load_model(path, cfg), cfg)
    with torch.no_grad():  # a LoRA that changes the answers (B starts at zero)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    plain = generate_answers_sharded(model, processor, collator, rows, 1, 4)
    result["plain_equal"] = plain == generate_answers(model, processor, collator, rows, 1, 4)
    result["answers"] = plain

    # FSDP2: one step on the sharded model vs the same step on an unsharded copy
    reference = copy.deepcopy(model)
    before = {k: v.clone() for k, v in reference.state_dict().items() if "lora_" in k}
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.base_model.model.model.text_model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    batch = collator(rows[:2])  # the same batch on both ranks: the averaged gradient is the copy's gradient
    for m in (model, reference):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        m.train()
        m(**batch).loss.backward()
        opt.step()
    full = full_state_dict(model)
    expected = {k: v for k, v in reference.state_dict().items() if "lora_" in k}
    if rank == 0:
        result["fsdp_full_equal"] = all(torch.allclose(full[k], v, atol=1e-6) for k, v in expected.items())
        result["fsdp_changed"] = any(not torch.equal(v, before[k]) for k, v in expected.items())
        model.save_pretrained(Path(out) / "fsdp_adapter", state_dict=full)
        saved = load_file(str(Path(out) / "fsdp_adapter" / "adapter_model.safetensors"))
        ref_saved = {k.replace(".default", ""): v for k, v in expected.items()}
        result["fsdp_saved_keys_equal"] = set(saved) == set(ref_saved)
        result["fsdp_saved_equal"] = set(saved) == set(ref_saved) and all(
            torch.allclose(saved[k], ref_saved[k], atol=1e-6) for k in saved
        )
    else:
        result["fsdp_full_empty"] = not full
    sharded = generate_answers_sharded(model, processor, collator, rows, 1, 4)
    result["fsdp_generate_equal"] = sharded == generate_answers(reference, processor, collator, rows, 1, 4)
    # the model whose generate() runs steps every rank until all are done (a rank that meets its end
    # token first keeps joining the others' all-gathers)
    result["fsdp_synced"] = is_fsdp_managed_module(model.base_model.model)
    result["plain_not_synced"] = not is_fsdp_managed_module(reference.base_model.model)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
