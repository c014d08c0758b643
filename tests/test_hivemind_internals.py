"""The pinned hivemind still has the private shape that blockswarm/peer/hivemind_internals.py overrides and calls.

Reads hivemind's classes and source only (no DHT, no averager): a newer hivemind fails here, by name, rather than
by stage-mates that quietly stop averaging.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

import hivemind
import pytest
from hivemind.averaging import DecentralizedAverager
from hivemind.optim import Optimizer
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager

from blockswarm.peer import hivemind_internals

MODULE = "blockswarm/peer/hivemind_internals.py"
PINNED_VERSION = "1.1.12"


def _changed(what: str) -> str:
    return f"the pinned hivemind changed: {MODULE} overrides or calls {what}; update it"


# (hivemind class, name, kind, parameter names): every hivemind method or property that the module overrides, or
# calls although it is private, with the parameters that it passes or accepts
MEMBERS = [
    (Optimizer, "_make_state_averager", "method", ["self", "kwargs"]),
    (Optimizer, "_make_progress_tracker", "method", ["self", "target_batch_size", "kwargs"]),
    (Optimizer, "_maybe_schedule_gradient_averaging", "method", ["self"]),
    (Optimizer, "_maybe_schedule_state_averaging", "method", ["self"]),
    (Optimizer, "_should_load_state_from_peers", "method", ["self"]),
    (Optimizer, "_update_global_epoch", "method", ["self", "grad_scaler"]),
    (TrainingStateAverager, "_apply_optimizer_parameters_", "method", ["self"]),
    (TrainingStateAverager, "load_state_from_peers", "method", ["self", "kwargs"]),
    (DecentralizedAverager, "load_state_from_peers", "method", ["self", "wait", "timeout"]),
    (DecentralizedAverager, "run", "method", ["self"]),
    (DecentralizedAverager, "rpc_aggregate_part", "method", ["self", "stream", "context"]),
    (DecentralizedAverager, "request_timeout", "property", None),
    (
        GradientAverager,
        "step",
        "method",
        ["self", "weight", "reset_accumulators", "control", "timeout", "wait", "kwargs"],
    ),
    (ProgressTracker, "_progress_reporter", "async method", ["self"]),
    (ProgressTracker, "ready_to_update_epoch", "property", None),
    (ProgressTracker, "global_epoch", "property", None),
]

# (hivemind class, attributes that its __init__ sets and the module reads or writes)
INSTANCE_ATTRIBUTES = [
    (
        Optimizer,
        # what `_make_state_averager` and `_make_progress_tracker` pass on, and the booked gradient round
        {"dht", "run_id", "matchmaking_time", "allreduce_timeout", "shutdown_timeout", "offload_optimizer"}
        | {"status_loglevel", "next_chunk_timeout", "client_mode", "auxiliary", "tracker", "grad_averager"},
    ),
    # `StageOptimizer.accumulate` folds each micro-batch into `.grad` knowing hivemind's counts
    (GradientAverager, {"local_times_accumulated", "local_samples_accumulated"}),
    (TrainingStateAverager, {"optimizer", "pending_updates", "finished_optimizer_step", "finished_averaging_round"}),
    # `_WaitsForLateGroupmates` waits for a group to be registered, up to the chunk timeout
    (DecentralizedAverager, {"_running_groups", "next_chunk_timeout"}),
    (
        ProgressTracker,
        {"dht", "training_progress_key", "_local_public_key", "target_batch_size", "metadata_expiration"}
        | {"local_progress", "global_progress", "should_report_progress", "shutdown_triggered"},
    ),
]

# (hivemind function, names it must still call): without these calls, an override is silently never used
CALLS = [
    (Optimizer.__init__, {"_make_state_averager", "_make_progress_tracker"}),
    # the checks, bookings and update that `follow_stage_epoch` runs as `step` does
    (
        Optimizer.step,
        {"_maybe_schedule_gradient_averaging", "_maybe_schedule_state_averaging"}
        | {"_should_load_state_from_peers", "load_state_from_peers", "_update_global_epoch"},
    ),
    (TrainingStateAverager.load_state_from_peers, {"load_state_from_peers", "_apply_optimizer_parameters_"}),
    (TrainingStateAverager.step, {"_apply_optimizer_parameters_"}),
    (ProgressTracker.run, {"_progress_reporter"}),
]


def _tree(function) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(function)))


def _kind(member) -> str:
    if isinstance(member, property):
        return "property"
    if inspect.iscoroutinefunction(member):
        return "async method"
    if inspect.isfunction(member):
        return "method"
    return type(member).__name__


def _factory_keywords(function) -> dict[str, str]:
    """The keyword arguments (as source) of the call that a `_make_*` factory returns."""
    (returned,) = [node for node in ast.walk(_tree(function)) if isinstance(node, ast.Return)]
    return {keyword.arg or "**": ast.unparse(keyword.value) for keyword in returned.value.keywords}


def test_hivemind_is_the_version_the_overrides_were_written_against():
    assert hivemind.__version__ == PINNED_VERSION, (
        f"the pinned hivemind changed: {MODULE} overrides private methods of hivemind {PINNED_VERSION}, and "
        f"hivemind {hivemind.__version__} is installed; check each name listed in its docstring against the new "
        f"source, update it, then PINNED_VERSION here"
    )


@pytest.mark.parametrize(
    ("cls", "name", "kind", "parameters"), MEMBERS, ids=[f"{cls.__name__}.{name}" for cls, name, *_ in MEMBERS]
)
def test_member_has_the_expected_shape(cls, name, kind, parameters):
    what = f"{cls.__name__}.{name}"
    try:
        member = inspect.getattr_static(cls, name)
    except AttributeError:
        pytest.fail(_changed(f"{what}, which is gone"))
    assert _kind(member) == kind, _changed(f"{what} as a {kind}, and it is now: {_kind(member)}")
    if parameters is not None:
        actual = list(inspect.signature(member).parameters)
        assert actual == parameters, _changed(f"{what}{tuple(parameters)}, and it takes {tuple(actual)} now")


@pytest.mark.parametrize(
    ("cls", "attributes"), INSTANCE_ATTRIBUTES, ids=[cls.__name__ for cls, _ in INSTANCE_ATTRIBUTES]
)
def test_init_still_sets_the_attributes_used(cls, attributes):
    set_in_init = {
        node.attr
        for node in ast.walk(_tree(cls.__init__))
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    }
    missing = sorted(attributes - set_in_init)
    assert not missing, _changed(f"{cls.__name__} attributes {missing}, which its __init__ no longer sets")


@pytest.mark.parametrize(("function", "names"), CALLS, ids=[function.__qualname__ for function, _ in CALLS])
def test_hivemind_still_calls_what_the_module_overrides(function, names):
    called = {
        node.func.attr
        for node in ast.walk(_tree(function))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    missing = sorted(names - called)
    assert not missing, _changed(f"{missing}, which {function.__qualname__} no longer calls")


def test_step_still_checks_ready_to_update_epoch():
    read = {node.attr for node in ast.walk(_tree(Optimizer.step)) if isinstance(node, ast.Attribute)}
    assert "ready_to_update_epoch" in read, _changed("ready_to_update_epoch, which Optimizer.step no longer reads")


def test_accumulated_gradients_are_still_divided_by_the_micro_batch_count():
    source = inspect.getsource(GradientAverager.load_accumulators_into_averager_)
    assert "1.0 / self.local_times_accumulated" in source, _changed(
        "the mean of the reused .grad buffers over local_times_accumulated (StageOptimizer.accumulate keeps .grad "
        "at that count times the sample-weighted mean)"
    )


def test_a_part_for_an_unregistered_group_is_still_refused():
    source = inspect.getsource(DecentralizedAverager.rpc_aggregate_part)
    assert "request.group_id not in self._running_groups" in source and "BAD_GROUP_ID" in source, _changed(
        "rpc_aggregate_part's lookup of the group in _running_groups"
    )


def test_the_averaging_weight_is_still_the_samples_unless_given():
    source = inspect.getsource(GradientAverager.step)
    assert "self.local_samples_accumulated if weight is None else weight" in source, _changed(
        "GradientAverager.step's weight (the samples accumulated, or the weight passed)"
    )


def test_a_downloaded_state_still_carries_its_epoch():
    source = inspect.getsource(TrainingStateAverager.get_current_state)
    assert "epoch=self.local_epoch" in source, _changed("the 'epoch' of a downloaded state's metadata")


@pytest.mark.parametrize(
    ("ours", "theirs", "own_keywords"),
    [
        (
            hivemind_internals.StageHivemindOptimizer._make_state_averager,
            Optimizer._make_state_averager,
            {"parameters_lock"},
        ),
        (hivemind_internals.StageHivemindOptimizer._make_progress_tracker, Optimizer._make_progress_tracker, set()),
    ],
    ids=["_make_state_averager", "_make_progress_tracker"],
)
def test_factories_still_pass_what_hivemind_passes(ours, theirs, own_keywords):
    expected = _factory_keywords(theirs)
    actual = {name: value for name, value in _factory_keywords(ours).items() if name not in own_keywords}
    hivemind_only = {name: value for name, value in expected.items() if actual.get(name) != value}
    module_only = {name: value for name, value in actual.items() if expected.get(name) != value}
    assert not (hivemind_only or module_only), _changed(
        f"Optimizer.{theirs.__name__}, whose arguments differ now: hivemind passes {hivemind_only}, "
        f"where the module passes {module_only}"
    )


def test_every_override_is_checked():
    checked = {name for _, name, _, _ in MEMBERS}
    for cls in vars(hivemind_internals).values():
        if not (isinstance(cls, type) and cls.__module__ == hivemind_internals.__name__):
            continue
        hivemind_bases = [base for base in cls.__mro__ if base.__module__.startswith("hivemind.")]
        for name in vars(cls):
            if not name.startswith("__") and any(name in vars(base) for base in hivemind_bases):
                assert name in checked, f"{MODULE}: {cls.__name__}.{name} overrides hivemind; add it to MEMBERS here"
