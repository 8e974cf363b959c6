"""Depth extrapolation: the step of a deep stack from three shallow ones, exact or refused.

The unit tests build toy steps whose structure is known; the slow matrix runs real tiny models
(``tests/probes/tiny_families.py``) at the base depths and at full depth and checks that the
extrapolated step is the full-depth step, event for event (runs of allocations and of releases,
each allocation's op and size line), so every batch size's peak is the same to the byte.
"""

from __future__ import annotations

import concurrent.futures
import gc
from dataclasses import dataclass, field

import pytest
import torch

from probes.depth import (
    BASE_DEPTHS,
    EXACT_FAMILIES,
    DepthMismatch,
    DepthPlan,
    depth_plan,
    extrapolate_depth,
    learn_edit,
    model_depth,
    reduced_depth_overrides,
    same_step,
)
from probes.isolate import child_context
from probes.models import load_config
from probes.spec import ConfigTask, ModelSpec, Precision
from probes.timeline import ALLOC, AffineTimeline, fit_affine
from probes.trial import TrialSession
from tests.probes.tiny_families import FAMILIES, attn_implementation, tiny

# -- toy steps ----------------------------------------------------------------------------------


@dataclass
class Toy:
    """Builds an affine timeline event by event; ``alloc`` returns the allocation's index."""

    events: list[int] = field(default_factory=list)
    intercepts: list[int] = field(default_factory=list)
    slopes: list[int] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)

    def alloc(self, op: str, intercept: int, slope: int = 0) -> int:
        self.events.append(ALLOC)
        self.intercepts.append(intercept)
        self.slopes.append(slope)
        self.ops.append(op)
        return len(self.intercepts) - 1

    def free(self, *indices: int) -> None:
        self.events.extend(indices)

    def timeline(self) -> AffineTimeline:
        return AffineTimeline(
            granularity_bytes=512,
            events=tuple(self.events),
            intercepts=tuple(self.intercepts),
            slopes=tuple(self.slopes),
            min_batch_size=2,
            ops=tuple(self.ops),
        )


def toy_step(
    layers: int, *, wide_layer: int | None = None, pattern: tuple[int, ...] = (1,)
) -> AffineTimeline:
    """A decoder step: weights, forward, backward, clipping (a stack of per-tensor norms), AdamW.

    ``pattern`` scales each layer's activations by layer index (a repeating pattern of layer
    kinds); ``wide_layer`` makes one layer's activation different (a stack that does not repeat).
    """
    toy = Toy()
    weights = [toy.alloc("(live at start)", 40_000) for _ in range(layers + 2)]
    toy.alloc("(live at start)", 80_000)  # embeddings
    saved = []
    hidden = toy.alloc("aten.embedding.default", 0, 1024)
    for layer in range(layers):
        scale = pattern[layer % len(pattern)] * (3 if layer == wide_layer else 1)
        saved.append(toy.alloc("aten.mm.default", 0, 4096 * scale))
        saved.append(toy.alloc("aten.gelu.default", 0, 4096 * scale))
    logits = toy.alloc("aten.mm.default", 0, 64_000)
    loss = toy.alloc("aten.nll_loss.default", 4)
    toy.free(logits)
    grads = []
    for layer in reversed(range(layers)):
        grads.append(toy.alloc("aten.mm.default", 40_000))
        toy.free(saved[2 * layer + 1], saved[2 * layer])
    toy.free(hidden, loss)
    norms = [toy.alloc("aten._foreach_norm.Scalar", 4) for _ in weights]
    stacked = toy.alloc("aten.stack.default", 4 * len(weights))  # grows with depth
    toy.free(*norms, stacked)
    temporaries = [toy.alloc("aten._foreach_sqrt.default", 40_000) for _ in weights]
    toy.free(*reversed(temporaries))
    toy.free(*grads)
    return toy.timeline()


def peaks(timeline: AffineTimeline) -> list[int]:
    return [timeline.peak(b) for b in (2, 3, 17, 100, 1000)]


def test_a_repeating_stack_is_extrapolated_exactly() -> None:
    bases = {depth: toy_step(depth) for depth in BASE_DEPTHS}
    for depth in (5, 6, 32, 80):
        extrapolated = extrapolate_depth(bases, depth)
        assert same_step(extrapolated, toy_step(depth))
        assert peaks(extrapolated) == peaks(toy_step(depth))


def test_the_edit_inserts_a_layer_and_grows_the_stack_of_norms() -> None:
    edit = learn_edit(toy_step(3), toy_step(4))
    resized = [grow.resized for grow in edit.growth.values() if grow.resized]
    # 4 bytes more per parameter tensor, where the stack is made and where it is released
    assert resized == [((("aten.stack.default", 0, 4 * 5), 4),)] * 2
    inserted = sum(n for runs in edit.inserts.values() for run in runs for _, n in run.items)
    added = sum(n for grow in edit.growth.values() for _, n in grow.added)
    assert inserted + added == len(toy_step(4).events) - len(toy_step(3).events)


def test_a_stack_that_does_not_repeat_is_refused() -> None:
    # Layer 4 is wider than the rest: depths 3 -> 4 learn a wide layer that 4 -> 5 does not add.
    bases = {depth: toy_step(depth, wide_layer=3) for depth in BASE_DEPTHS}
    with pytest.raises(DepthMismatch, match="does not give the step at depth 5"):
        extrapolate_depth(bases, 32)


def test_a_pattern_of_two_layer_kinds_needs_a_step_of_two() -> None:
    alternating = (1, 2)
    with pytest.raises(DepthMismatch):
        extrapolate_depth({depth: toy_step(depth, pattern=alternating) for depth in BASE_DEPTHS}, 32)
    bases = {depth: toy_step(depth, pattern=alternating) for depth in (4, 6, 8)}
    assert same_step(extrapolate_depth(bases, 32), toy_step(32, pattern=alternating))
    with pytest.raises(ValueError, match="not 4 plus a multiple of 2"):
        extrapolate_depth(bases, 31)


def test_release_order_inside_a_run_does_not_matter() -> None:
    """autocast releases its weight copies in hash-table order: runs of releases compare as sets."""
    shuffled = Toy()
    a, b, c = (shuffled.alloc("aten._to_copy.default", size) for size in (512, 1024, 2048))
    shuffled.free(c, a, b)
    ordered = Toy()
    a, b, c = (ordered.alloc("aten._to_copy.default", size) for size in (512, 1024, 2048))
    ordered.free(a, b, c)
    assert same_step(shuffled.timeline(), ordered.timeline())


@pytest.mark.parametrize(
    ("depths", "depth", "message"),
    [
        ((3, 4), 10, "three or more"),
        ((3, 4, 6), 10, "evenly spaced"),
        ((3, 4, 5), 2, "not 3 plus a multiple of 1"),
    ],
)
def test_bad_depths_are_refused(depths: tuple[int, ...], depth: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        extrapolate_depth({d: toy_step(d) for d in depths}, depth)


def test_timelines_without_ops_cannot_be_aligned() -> None:
    bare = AffineTimeline(
        granularity_bytes=512, events=(ALLOC,), intercepts=(1,), slopes=(0,), min_batch_size=2
    )
    with pytest.raises(DepthMismatch, match="ops"):
        extrapolate_depth({3: bare, 4: bare, 5: bare}, 10)


# -- allocations sized by the whole model (DDP's buckets) --------------------------------------------

BUCKETS, REBUILT = "ddp: gradient buckets", "ddp: rebuilt gradient buckets"
BUCKET_CAP = 100_000


def bucket_sizes(layers: int) -> list[int]:
    """Gradients of 40,000 bytes per layer packed into buckets of at most 100,000 (one odd one)."""
    total = 40_000 * (layers + 2) + 80_000
    return [BUCKET_CAP] * (total // BUCKET_CAP) + [total % BUCKET_CAP + 7]


def ddp_step(layers: int, *, rebuilt_at: str = "forward") -> AffineTimeline:
    """``toy_step``'s shape with buckets live from the start, freed and rebuilt in the second forward."""
    toy = Toy()
    for _ in range(layers + 2):
        toy.alloc("(live at start)", 40_000)
    old = [toy.alloc(BUCKETS, size) for size in bucket_sizes(layers)]
    hidden = toy.alloc("aten.embedding.default", 0, 1024)
    toy.free(*old)
    for size in reversed(bucket_sizes(layers)):
        toy.alloc(REBUILT, size)
    saved = [toy.alloc("aten.mm.default", 0, 4096) for _ in range(layers)]
    if rebuilt_at == "twice":  # after a release: another point of the step
        toy.free(toy.alloc("aten.mul.default", 0, 8))
        toy.alloc(REBUILT, 512)
    toy.alloc("aten.mm.default", 0, 64_000)
    toy.free(*reversed(saved), hidden)
    return toy.timeline()


def charged(sizes: list[int]) -> int:
    return sum(-(-size // 512) * 512 for size in sizes)


def test_allocations_sized_by_the_whole_model_take_its_bytes() -> None:
    bases = {depth: ddp_step(depth) for depth in BASE_DEPTHS}
    with pytest.raises(DepthMismatch):  # the bucket count does not follow the layers
        extrapolate_depth(bases, 32)
    whole = {BUCKETS: charged(bucket_sizes(32)), REBUILT: charged(bucket_sizes(32))}
    extrapolated = extrapolate_depth(bases, 32, whole)
    assert peaks(extrapolated) == peaks(ddp_step(32))
    assert extrapolated.peak(2) != extrapolate_depth(bases, 32, {BUCKETS: 0, REBUILT: 0}).peak(2)


def test_whole_model_labels_must_be_made_at_one_point_of_the_step() -> None:
    twice = {depth: ddp_step(depth, rebuilt_at="twice") for depth in BASE_DEPTHS}
    with pytest.raises(DepthMismatch, match="allocated at 2 points"):
        extrapolate_depth(twice, 32, {BUCKETS: 1024, REBUILT: 1024})
    absent = {depth: toy_step(depth) for depth in BASE_DEPTHS}
    with pytest.raises(DepthMismatch, match="allocated at 0 points"):
        extrapolate_depth(absent, 32, {BUCKETS: 1024})
    growing = Toy()
    growing.alloc(BUCKETS, 0, 64)
    with pytest.raises(DepthMismatch, match="grows with the batch size"):
        extrapolate_depth({d: growing.timeline() for d in BASE_DEPTHS}, 32, {BUCKETS: 1024})


# -- configs and plans ------------------------------------------------------------------------------


def test_reduced_depth_cuts_the_depth_and_every_per_layer_list() -> None:
    config = {
        "num_hidden_layers": 6,
        "layer_types": ["sliding", "full"] * 3,
        "no_rope_layers": [1, 1, 1, 0, 1, 1],
        "hidden_size": 64,
        "bad_words": ["a", "b"],
    }
    assert reduced_depth_overrides(config, 4) == {
        "num_hidden_layers": 4,
        "layer_types": ["sliding", "full", "sliding", "full"],
        "no_rope_layers": [1, 1, 1, 0],
    }
    assert model_depth({"n_layer": 12}) == ("n_layer", 12)
    assert model_depth({"hidden_size": 64}) is None
    with pytest.raises(ValueError, match="exclusive"):
        reduced_depth_overrides(config, 6)
    with pytest.raises(ValueError, match="no layer count"):
        reduced_depth_overrides({"hidden_size": 64}, 2)


def test_depth_plans() -> None:
    assert depth_plan("llama", {"num_hidden_layers": 32}) == DepthPlan("num_hidden_layers", 32, (3, 4, 5))
    assert depth_plan("gpt2", {"n_layer": 48}) == DepthPlan("n_layer", 48, (3, 4, 5))
    alternating = {"num_hidden_layers": 42, "layer_types": ["sliding_attention", "full_attention"] * 21}
    assert depth_plan("gemma2", alternating) == DepthPlan("num_hidden_layers", 42, (4, 6, 8))
    reasons = {
        "unknown": depth_plan("some_new_model", {"num_hidden_layers": 32}),
        "shallow": depth_plan("llama", {"num_hidden_layers": 5}),
        "long pattern": depth_plan(
            "gemma2", {"num_hidden_layers": 24, "layer_types": [1, 1, 1, 1, 1, 0] * 4}
        ),
        "dense layers": depth_plan("qwen3_moe", {"num_hidden_layers": 24, "mlp_only_layers": [0]}),
        "sparse step": depth_plan("qwen2_moe", {"num_hidden_layers": 24, "decoder_sparse_step": 2}),
        "off period": depth_plan("gemma2", {"num_hidden_layers": 7, "layer_types": [0, 1, 0, 1, 0, 1, 0]}),
    }
    assert all(isinstance(reason, str) for reason in reasons.values()), reasons
    assert "not shown exact" in str(reasons["unknown"])


# -- real models: extrapolated = full depth, to the event ----------------------------------------

MATRIX_DEPTH = 8
PRECISIONS = tuple(Precision)
CORE = ("gpt2", "llama", "mistral", "qwen2")
Case = tuple[str, Precision, bool, int, str]
CASES: list[Case] = [
    *(
        (family, precision, checkpointing, MATRIX_DEPTH, "simulated")
        for family in CORE
        for precision in PRECISIONS
        for checkpointing in (False, True)
    ),
    ("llama", Precision.BF16_MIXED, True, MATRIX_DEPTH, "predict"),
    ("gpt2", Precision.FP32, False, MATRIX_DEPTH, "predict"),
    *(
        (family, Precision.BF16_MIXED, True, 10 if family == "gemma2" else MATRIX_DEPTH, "simulated")
        for family in sorted(EXACT_FAMILIES - set(CORE))
    ),
    ("llama", Precision.BF16_MIXED, True, 32, "simulated"),
]
"""GPT-2, Llama, Mistral and Qwen2 in every config, the other covered families in one, at 8 layers
(the edit applied 3 times past the base depths; Gemma 2, whose edit is 2 layers, at 10) and one
config at 32 layers, on ``simulated``
(whose timelines are ``predict``'s, event for event: test_timeline.py); two configs on ``predict``.
``bench/depth_families.py`` runs every config of every covered family at 12 layers."""


def affine_at(
    family: str, precision: Precision, checkpointing: bool, layers: int, device: str
) -> AffineTimeline:
    task = ConfigTask(
        model=ModelSpec(architecture=family, config=tiny(family, layers=layers)),
        seq_len=32,
        precision=precision,
        gradient_checkpointing=checkpointing,
        attn_implementation=attn_implementation(family),
        device=device,
        memory_limit_bytes=2**34,
    )
    with TrialSession(task) as session:
        timelines = [session.run_with_timeline(b, accumulation_steps=2, optimizer_steps=2)[1] for b in (2, 3)]
    assert timelines[0] is not None
    assert timelines[1] is not None
    return fit_affine(timelines[0], timelines[1])


def extrapolated_and_full(case: Case) -> tuple[Case, bool, list[tuple[int, int]]]:
    """Runs in a worker process: (same runs?, (extrapolated, full-depth) peaks at a few sizes)."""
    torch.set_num_threads(1)
    gc.freeze()
    family, precision, checkpointing, layers, device = case
    config = load_config(
        ModelSpec(architecture=family, config=tiny(family, layers=layers)), allow_remote_code=False
    )
    plan = depth_plan(family, config.to_dict())
    assert isinstance(plan, DepthPlan), plan
    bases = {depth: affine_at(family, precision, checkpointing, depth, device) for depth in plan.base_depths}
    extrapolated = extrapolate_depth(bases, layers)
    full = affine_at(family, precision, checkpointing, layers, device)
    return (
        case,
        same_step(extrapolated, full),
        [(extrapolated.peak(b), full.peak(b)) for b in (2, 5, 64)],
    )


@pytest.fixture(scope="module")
def matrix() -> dict[Case, tuple[bool, list[tuple[int, int]]]]:
    with concurrent.futures.ProcessPoolExecutor(max_workers=2, mp_context=child_context()) as pool:
        return {case: (same, pairs) for case, same, pairs in pool.map(extrapolated_and_full, CASES)}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first test waits for the whole matrix
@pytest.mark.parametrize("case", CASES, ids=[f"{f}-{p.value}-{c}-{n}-{d}" for f, p, c, n, d in CASES])
def test_the_extrapolated_step_is_the_full_depth_step(
    matrix: dict[Case, tuple[bool, list[tuple[int, int]]]], case: Case
) -> None:
    same, pairs = matrix[case]
    assert same
    assert [extrapolated for extrapolated, _ in pairs] == [full for _, full in pairs]


def test_every_covered_family_has_a_tiny_config_and_a_case() -> None:
    assert set(CORE) <= EXACT_FAMILIES
    assert set(FAMILIES) >= EXACT_FAMILIES
    assert {family for family, *_ in CASES} == EXACT_FAMILIES
