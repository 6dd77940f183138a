"""Feeding generation (`vlm_tune.data.feeding`): loader workers, batches grouped by prompt length, row order,
bounded prefetch, less padding, same answers."""

import multiprocessing
import os

import pytest
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from vlm_tune.data.collate import ChatCollator, prompt_length
from vlm_tune.data.feeding import PREFETCH, plan_batches, prompt_lengths
from vlm_tune.evaluate import generate_answers

TEMPLATE = "{question}\nAnswer with a single word or number."


def varied_rows(n=10):
    """Rows whose prompts differ in length (image aspect → tiles, question length), long and short mixed."""
    rows = []
    for i in range(n):
        size = (64, 64) if i % 2 else (64, 12 + 4 * (i % 3))
        question = "How many bars are there" + " in this chart" * (3 * (i % 2) + i % 3) + "?"
        image = Image.new("RGB", size, (40 * (i % 5), 120, 200 - 30 * (i % 4)))
        rows.append({"id": f"r{i}", "images": [image], "question": question, "answers": ["3"]})
    return rows


class LengthModel(torch.nn.Module):
    """Stands in for a VLM: 'generates' one token whose id is the row's prompt length (its unpadded tokens),
    and records each batch it was given (row lengths, and the pid of the process that made it)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def generate(self, input_ids, attention_mask, worker_pid=None, **kwargs):
        lengths = attention_mask.sum(1)
        self.seen.append(
            {"lengths": lengths.tolist(), "pid": None if worker_pid is None else int(worker_pid)}
        )
        return torch.cat([input_ids, lengths[:, None]], 1)


class PidCollator(ChatCollator):
    """Adds the pid and loader-worker id of the process that built the batch."""

    def generation_batch(self, rows):
        batch = super().generation_batch(rows)
        info = get_worker_info()
        assert info is None or info.id < info.num_workers
        batch["worker_pid"] = torch.tensor(os.getpid())
        return batch


class CountingRows:
    """A lazy row sequence that counts rows materialised (across loader processes: a shared counter)."""

    def __init__(self, rows):
        self.rows = rows
        self.made = multiprocessing.get_context("fork").Value("i", 0)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, k):
        with self.made.get_lock():
            self.made.value += 1
        return self.rows[k]


def unpadded(processor, collator, row):
    return int(collator.generation_batch([row])["attention_mask"].sum())


def test_prompt_length_is_the_collated_length_without_decoding(processor):
    from vlm_tune.data.images import ImageSize

    collator = ChatCollator(processor, "Be brief.", TEMPLATE)
    for row in varied_rows(6):
        sized = {**row, "images": [ImageSize(*im.size) for im in row["images"]]}
        assert prompt_length(processor, collator, sized) == unpadded(processor, collator, row)


def test_lazy_rows_are_measured_from_image_headers(tmp_path, processor, monkeypatch):
    """The length pass over a lazy split reads image sizes from headers: no image is decoded for it."""
    import vlm_tune.data.images as images
    from vlm_tune.config import build_config
    from vlm_tune.data.sources import LazyRows, load_split, prepare_split

    cfg = build_config({"data": {"synthetic": {"n_train": 4, "n_test": 6, "seed": 3, "image_size": 48}}})
    lazy = LazyRows.of(prepare_split(load_split(cfg.data, "test", tmp_path)))
    collator = ChatCollator(processor, None, TEMPLATE)
    expected = [prompt_length(processor, collator, lazy[k]) for k in range(len(lazy))]

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded to measure a row")

    monkeypatch.setattr(images, "open_image", no_decoding)
    assert prompt_lengths(processor, collator, lazy) == expected
    assert lazy.take([4, 1]).indices == [lazy.indices[4], lazy.indices[1]]


def test_plan_batches_longest_first_and_ties_in_row_order():
    assert plan_batches(5, 2) == [[0, 1], [2, 3], [4]]
    assert plan_batches(5, 2, [3, 9, 3, 7, 9]) == [[1, 4], [3, 0], [2]]


def test_sorted_batches_answer_in_row_order(processor):
    rows = varied_rows(10)
    collator = ChatCollator(processor, None, TEMPLATE)
    model = LengthModel()
    answers = generate_answers(model, processor, collator, rows, 4, 1, postprocess=str, workers=0, sort=True)
    tok = processor.tokenizer
    assert answers == [tok.decode([unpadded(processor, collator, r)]) for r in rows]
    longest = [max(b["lengths"]) for b in model.seen]
    assert longest == sorted(longest, reverse=True) and len(set(longest)) > 1  # batches went longest first


def test_padding_fraction_is_lower_sorted(processor):
    rows = varied_rows(12)
    collator = ChatCollator(processor, None, TEMPLATE)
    plain, grouped = {}, {}
    generate_answers(LengthModel(), processor, collator, rows, 4, 1, workers=0, sort=False, stats=plain)
    generate_answers(LengthModel(), processor, collator, rows, 4, 1, workers=0, sort=True, stats=grouped)
    assert plain["prompt_tokens"] - plain["pad_tokens"] == grouped["prompt_tokens"] - grouped["pad_tokens"]
    assert grouped["pad_tokens"] / grouped["prompt_tokens"] < plain["pad_tokens"] / plain["prompt_tokens"] / 2


def test_loader_runs_the_workers_runtime_decides(processor, monkeypatch):
    import vlm_tune.runtime as runtime

    asked = []

    def two_workers(setting, hw=None):
        asked.append(setting)
        return 2, "test"

    monkeypatch.setattr(runtime, "data_workers", two_workers)
    rows = varied_rows(12)
    model, stats = LengthModel(), {}
    collator = PidCollator(processor, None, TEMPLATE)
    answers = generate_answers(model, processor, collator, rows, 2, 1, postprocess=str, stats=stats)
    assert asked == ["auto"] and stats["workers"] == 2
    pids = {b["pid"] for b in model.seen}
    assert os.getpid() not in pids and len(pids) == 2  # every batch was made in one of the two workers
    assert answers == [processor.tokenizer.decode([unpadded(processor, collator, r)]) for r in rows]


def test_evaluate_asks_runtime_with_its_workers_setting(processor, monkeypatch, tmp_path):
    import vlm_tune.runtime as runtime
    from vlm_tune.evaluate import evaluate

    asked = []
    monkeypatch.setattr(runtime, "data_workers", lambda setting, hw=None: (asked.append(setting) or 0, ""))
    rows = varied_rows(4)
    m = evaluate(
        LengthModel(), processor, ChatCollator(processor, None, TEMPLATE), rows, tmp_path, 2, 1, workers=3
    )
    assert asked == [3] and m["data_workers"] == 0 and 0 <= m["padding_fraction"] < 1


@pytest.mark.parametrize("workers", [0, 2])
def test_rows_materialised_stay_within_the_prefetch_bound(processor, monkeypatch, workers):
    """Rows (and so decoded images) are taken batch by batch: when batch j reaches the model, at most
    j + 1 + workers × PREFETCH batches of rows were materialised (all of them: the old eager way)."""
    import vlm_tune.runtime as runtime

    monkeypatch.setattr(runtime, "data_workers", lambda setting, hw=None: (workers, ""))
    rows = CountingRows(varied_rows(24))
    made = []

    class Watching(LengthModel):
        def generate(self, **batch):
            made.append(rows.made.value)
            return super().generate(**batch)

    bs = 2
    collator = ChatCollator(processor, None, TEMPLATE)
    generate_answers(Watching(), processor, collator, rows, bs, 1, sort=False)
    assert rows.made.value == len(rows)  # each row taken once
    for j, n in enumerate(made):
        assert n <= (j + 1 + workers * PREFETCH) * bs
    assert made[0] < len(rows)


@pytest.mark.slow
def test_sorted_answers_equal_unsorted_on_the_tiny_model(tiny_dir, processor):
    """Grouping by length changes which rows share a batch (and their left padding), never the answers."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.float32)
    collator = ChatCollator(processor, "Be brief.", TEMPLATE)
    rows = varied_rows(10)
    assert plan_batches(10, 4, prompt_lengths(processor, collator, rows)) != plan_batches(10, 4)
    sorted_, stats = generate_answers(model, processor, collator, rows, 4, 6, workers=0, sort=True), {}
    plain = generate_answers(model, processor, collator, rows, 4, 6, workers=0, sort=False, stats=stats)
    alone = generate_answers(model, processor, collator, rows, 1, 6, workers=0, sort=False)
    assert sorted_ == plain == alone
    assert stats["pad_tokens"] > 0 and len(set(alone)) > 1
