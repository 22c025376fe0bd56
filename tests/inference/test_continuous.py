"""Continuous batching: rows join a running slot batch between chunks and leave it when done; each row
gives what `generate` gives it alone (greedy), a seeded row what it gives alone with that seed, and a
short request that arrives while a long one decodes is answered before the long one ends."""

import threading

import jax
import numpy as np
import pytest
from serving_fixtures import PATIENCE, shared_chat_model

from llava_jax.bench import serve as serve_bench
from llava_jax.inference import generate
from llava_jax.inference import slots as slot_batch
from llava_jax.inference.continuous import ContinuousScheduler
from llava_jax.inference.sampling import GREEDY, Sampling
from llava_jax.inference.scheduler import Done, Job
from llava_jax.inference.slots import SlotBatch


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return shared_chat_model(tmp_path_factory)


def _prompt(chat, text, image=False):
    return chat.prompt_ids([text], image=image).tolist()


def _drain(engine, produced, ahead=False):
    """Run chunks until every running row has ended (EOS or budget); tokens land in `produced[slot]`."""
    while engine.rows:
        for slot, tokens in engine.run(ahead=ahead).items():
            produced[slot] += tokens
        for slot in list(engine.rows):
            if len(produced[slot]) >= engine.rows[slot].limit or produced[slot][-1] in engine.eos_set:
                engine.release(slot)


@pytest.mark.parametrize("stacked", [False, True], ids=["platform-layout", "stacked"])
def test_rows_joining_a_running_batch_equal_generate_alone(chat, stacked, monkeypatch):
    """Rows of different prompt lengths (text and image) join at different chunks, one of them with a
    prompt longer than the cache before the write index (the cache is rebased to make room). Run with
    the platform's cache layout (per layer on a CPU) and with the stacked cache and scanned layers that
    other platforms use."""
    if stacked:
        monkeypatch.setattr(slot_batch, "arrays_platform", lambda _: "gpu")
    model, eos = chat.model, chat.eos_ids
    image = np.random.default_rng(3).integers(0, 256, (1, chat.image_size, chat.image_size, 3), dtype=np.uint8)
    jobs = [
        (_prompt(chat, "hi"), None, 20),
        (_prompt(chat, "Describe it.", image=True), image, 9),
        (_prompt(chat, "A longer question " + "with many words " * 12), None, 12),
    ]
    engine = SlotBatch(model, slots=4, chunk=4, eos_ids=eos)
    assert (engine._layers is None) == stacked
    produced = {}
    for k, (prompt, img, budget) in enumerate(jobs):
        images = None if img is None else img[None]
        (slot,), (first,) = engine.admit([prompt], images, [budget], [0], [GREEDY])
        produced[slot] = [first]
        if k < len(jobs) - 1:  # one chunk for the running rows before the next one joins
            for s, tokens in engine.run().items():
                produced[s] += tokens
    _drain(engine, produced)
    for (prompt, img, budget), slot in zip(jobs, sorted(produced), strict=True):
        want = generate(model, [prompt], None if img is None else img[None], max_new_tokens=budget, eos_ids=eos)[0]
        got = [t for t in produced[slot] if t not in engine.eos_set]
        assert got == want, (slot, got, want)


def test_one_admission_of_mixed_prompts_equals_generate_alone(chat):
    """Text and image prompts of several lengths admitted together are prefilled in separate calls
    (by length bucket and image use, 2^k rows each); every row still gives what `generate` gives it
    alone, and rows that join a running batch do too."""
    model, eos = chat.model, chat.eos_ids
    rng = np.random.default_rng(5)
    size = chat.image_size
    pictures = rng.integers(0, 256, (6, 1, size, size, 3), dtype=np.uint8)
    jobs = [
        (_prompt(chat, "hi"), 6),
        (_prompt(chat, "What is shown?", image=True), 9),
        (_prompt(chat, "A longer question " + "with many words " * 12), 7),
        (_prompt(chat, "yo"), 5),
        (_prompt(chat, "And here?", image=True), 8),
        (_prompt(chat, "ok then"), 4),
    ]
    prompts = [p for p, _ in jobs]
    images = pictures.copy()
    image_id = model.cfg.image_token_id
    for i, p in enumerate(prompts):
        if image_id not in p:
            images[i] = 0  # as the scheduler fills them: rows without an image get zeros
    engine = SlotBatch(model, slots=8, chunk=3, eos_ids=eos)
    groups = engine.groups(prompts, images)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        assert len(g) & (len(g) - 1) == 0, groups  # 2^k rows, no padding rows
        assert len({image_id in prompts[i] for i in g}) == 1, groups  # text and image prompts apart
    assert groups == [[0, 3], [5], [1, 4], [2]], groups  # prompt lengths 40, 110, 79, 40, 109, 41

    produced = {}
    (slot,), (first,) = engine.admit([prompts[5]], None, [jobs[5][1]], [0], [GREEDY])
    produced[slot] = [first]
    for s, tokens in engine.run().items():
        produced[s] += tokens
    slots, firsts = engine.admit(prompts[:5], images[:5], [b for _, b in jobs[:5]], [0] * 5, [GREEDY] * 5)
    produced.update({s: [f] for s, f in zip(slots, firsts, strict=True)})
    _drain(engine, produced)
    for (prompt, budget), i in zip(jobs, [*range(5), 5], strict=True):
        slot = slots[i] if i < 5 else min(set(produced) - set(slots))
        img = pictures[i : i + 1] if image_id in prompt else None
        want = generate(model, [prompt], img, max_new_tokens=budget, eos_ids=eos)[0]
        got = [t for t in produced[slot] if t not in engine.eos_set]
        assert got == want, (i, got, want)


def test_chunk_in_flight_keeps_rows_apart(chat):
    """With one chunk kept in flight (`run(ahead=True)`), a row released early (as on a stop string)
    while the next chunk already computes it, and a newcomer that takes its slot meanwhile: the
    newcomer gets none of the old row's tokens, and every row gives what `generate` gives it alone."""
    model, eos = chat.model, chat.eos_ids
    long, early, late = _prompt(chat, "hi"), _prompt(chat, "Tell me more."), _prompt(chat, "And then?")
    engine = SlotBatch(model, slots=2, chunk=3, eos_ids=eos)
    (s_long, s_early), firsts = engine.admit([long, early], None, [20, 12], [0, 0], [GREEDY, GREEDY])
    produced = {s_long: [firsts[0]], s_early: [firsts[1]]}
    for s, tokens in engine.run(ahead=True).items():  # the next chunk is dispatched before this one is read
        produced[s] += tokens
    assert engine._pending is not None and s_early in engine._pending.rows
    early_tokens = produced.pop(s_early)
    engine.release(s_early)
    (s_late,), (first,) = engine.admit([late], None, [9], [0], [GREEDY])
    assert s_late == s_early  # the slot is taken while the released row's chunk is in flight
    produced[s_late] = [first]
    _drain(engine, produced, ahead=True)
    for prompt, budget, got in ((long, 20, produced[s_long]), (late, 9, produced[s_late])):
        want = generate(model, [prompt], max_new_tokens=budget, eos_ids=eos)[0]
        assert [t for t in got if t not in engine.eos_set] == want
    want_early = generate(model, [early], max_new_tokens=12, eos_ids=eos)[0]
    assert len(early_tokens) == 4 and early_tokens == want_early[:4]


def test_seeded_row_ignores_its_slot_and_neighbours(chat):
    model, eos = chat.model, chat.eos_ids
    hot = Sampling(temperature=1.0, top_k=50)
    prompt = _prompt(chat, "Tell me a story.")

    def run(neighbours):
        engine = SlotBatch(model, slots=4, chunk=4, eos_ids=eos)
        produced = {}
        if neighbours:
            slots, firsts = engine.admit([_prompt(chat, "x"), _prompt(chat, "y z")], None, [7, 5], [1, 2], [hot, hot])
            produced.update({s: [f] for s, f in zip(slots, firsts, strict=True)})
            for s, tokens in engine.run().items():
                produced[s] += tokens
        (slot,), (first,) = engine.admit([prompt], None, [10], [7], [hot])
        produced[slot] = [first]
        _drain(engine, produced)
        return slot, produced[slot]

    slot_alone, alone = run(False)
    slot_shared, shared = run(True)
    assert slot_alone != slot_shared
    assert shared == alone
    want = generate(model, [prompt], max_new_tokens=10, sampling=hot, eos_ids=eos, seed=7)[0]
    assert [t for t in alone if t not in eos] == want


def test_short_request_overtakes_a_long_one(chat):
    """The short job arrives while the long one decodes (it is submitted from the long one's first
    piece of text): it joins at the next chunk and is answered before the long one. The batch
    scheduler would make it wait for the whole long batch."""
    long_prompt = _prompt(chat, "hi")
    budget = 24
    alone = generate(chat.model, [long_prompt], max_new_tokens=budget, eos_ids=chat.eos_ids)[0]
    assert len(alone) == budget, "the long job must not end early (EOS) for this test to say anything"
    scheduler = ContinuousScheduler(chat, max_batch=2, batch_wait_s=0, chunk_size=2)
    finished, lock, all_done = [], threading.Lock(), threading.Event()

    def emit_for(name):
        def emit(event):
            if name == "long" and not short_sent.is_set():
                short_sent.set()
                scheduler.submit(
                    Job(prompt=_prompt(chat, "yo"), image=None, max_tokens=2, sampling=GREEDY, emit=emit_for("short"))
                )
            if isinstance(event, Done):
                with lock:
                    finished.append((name, event))
                    if len(finished) == 2:
                        all_done.set()

        return emit

    short_sent = threading.Event()
    scheduler.submit(Job(prompt=long_prompt, image=None, max_tokens=budget, sampling=GREEDY, emit=emit_for("long")))
    scheduler.start()
    try:
        assert all_done.wait(PATIENCE), finished
    finally:
        scheduler.stop()
    assert [name for name, _ in finished] == ["short", "long"], finished
    assert finished[1][1].token_ids == alone
    assert dict(scheduler.batch_sizes) == {1: 2}  # two admissions of one job each


def test_nothing_compiles_after_warm_up(chat):
    """After `warm_up` for the server's limits, a mix of requests (text and image prompts of several
    lengths, budgets from 1 to the limit, greedy and sampled with different filters; arriving together,
    so later ones join running rows) is served without one compilation: jax reports no backend
    compilation while they run."""
    max_prompt, max_new = 150, 10
    scheduler = ContinuousScheduler(chat, max_batch=4, batch_wait_s=0, chunk_size=3)
    assert scheduler.warm_up(max_prompt_tokens=max_prompt, max_new_tokens=max_new) > 0
    rng = np.random.default_rng(0)
    size = chat.image_size
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    samplings = [GREEDY, Sampling(temperature=0.7), Sampling(temperature=1.0, top_k=5), Sampling(0.2, top_p=0.7)]
    jobs, done, lock = [], threading.Event(), threading.Lock()
    finished = []

    def emit(event):
        if isinstance(event, Done):
            with lock:
                finished.append(event)
                if len(finished) == len(jobs):
                    done.set()

    texts = ["hi", "What is it?", "A longer question " + "with many words " * 5, "x " * 40]
    for i in range(14):
        with_image = i % 3 == 0
        prompt = _prompt(chat, texts[i % len(texts)], image=with_image)
        assert len(prompt) <= max_prompt
        budget = [1, max_new, 4, 7, 2][i % 5]
        sampling = samplings[(i // 2) % len(samplings)]
        jobs.append(Job(prompt, image if with_image else None, budget, sampling, emit, seed=i))
    compiles = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for job in jobs:
            scheduler.submit(job)
        scheduler.start()
        assert done.wait(PATIENCE), len(finished)
    finally:
        scheduler.stop()
        jax.monitoring.unregister_event_duration_listener(listener)
    assert all(len(e.token_ids) >= 1 for e in finished)
    assert sum(scheduler.batch_sizes.values()) > 3, scheduler.batch_sizes  # rows joined running batches
    assert compiles == [], f"{len(compiles)} compilations after warm-up"


def test_ideal_ratio_simulation_by_hand():
    """`bench serve`'s ideal ratio on a load worked out by hand: budgets 3, 9, 3, 9, 4 clients, 2 slots.
    Batch: rows 0+1 run 8 steps, then 2+3 run 8 (16 steps; latencies 8 8 16 16). Continuous (joins
    every step): row 0 ends at 2, row 2 joins and ends at 4, row 3 joins, row 1 ends at 8, row 3 at 12
    (12 steps; latencies 2 4 8 12). With joins every 4 steps: 16 steps."""
    got = serve_bench.ideal([3, 9, 3, 9], clients=4, slots=2)
    assert got["batch"] == {"steps": 16, "latency_p50": 12.0}
    assert got["continuous"] == {"steps": 12, "latency_p50": 6.0}
    assert got["requests_s"] == pytest.approx(16 / 12) and got["latency_p50"] == pytest.approx(0.5)
    assert serve_bench.ideal([3, 9, 3, 9], clients=4, slots=2, chunk=4)["continuous"]["steps"] == 16
    # a closed loop: with one client, nothing ever shares a batch, and both take every step
    alone = serve_bench.ideal([3, 9, 3, 9], clients=1, slots=2)
    assert alone["batch"]["steps"] == alone["continuous"]["steps"] == 2 + 8 + 2 + 8


def test_loguniform_budgets_span_the_range_evenly_in_log():
    budgets = np.asarray(serve_bench.output_budgets("loguniform", (4, 256), 4000))
    assert budgets.min() >= 4 and budgets.max() <= 256
    short, long = np.mean(budgets < 16), np.mean(budgets >= 64)  # [4, 16) and [64, 256]: 2 of 6 octaves each
    assert 0.28 < short < 0.39 and 0.28 < long < 0.39, (short, long)


@pytest.mark.slow
def test_serve_benchmark_runs_at_a_tiny_size(tmp_path):
    """`python -m llava_jax.bench serve` end to end, both schedulers: every request answered, figures
    produced (no timing is asserted)."""
    out = tmp_path / "serve.json"
    argv = ["--clients", "2", "--requests", "3", "--max-tokens", "1", "3", "--words", "1", "2", "--out", str(out)]
    assert serve_bench.main(argv) == 0
    import json

    result = json.loads(out.read_text())
    for name in ("batch", "continuous"):
        figures = result["figures"][name]
        assert figures["failed"] == 0 and figures["requests"] == 3
        assert figures["requests_s"] > 0 and figures["tokens_s"] > 0
        assert 0 < figures["latency_p50_s"] <= figures["latency_p99_s"]
    assert set(result["ratios"]) == {"requests_s", "tokens_s", "latency_p50", "ttft_p50"}
