"""DTensor / FSDP2 and DDP: every fused optimizer on 2 CPU ranks (gloo on 127.0.0.1) against a
one-process run of the same optimizer on the same model. The ranks run in one subprocess
(tests/distributed_worker.py) for the whole module, under a timeout, so a hang fails instead of
blocking CI; each case's outcome is asserted by its own test here."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is needed"
)

WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT_S = 240
RTOL = 1e-5  # the target: sharded vs one process after 20 steps


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed") / "results.json"
    # a new session: on a timeout the whole process group (both ranks) is killed
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the 2-rank run did not finish in {TIMEOUT_S} s:\n{log[-4000:]}")
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"the 2-rank run failed (exit {proc.returncode}):\n{log[-4000:]}")
    return json.loads(out.read_text())


def outcome(results, name):
    assert name in results, f"case {name} did not run"
    r = results[name]
    assert r["error"] is None, r["error"]
    return r["value"]


OPTIMIZERS = [
    "Adam", "AdamW", "AdamW-amsgrad", "AdaX", "AdaXW", "Adafactor", "HFAdafactor", "HFAdafactor-beta1-lr",
    "SMMF", "SMMF-nobeta", "SMMF-dense-adam",
]  # fmt: skip
FACTORED = ["Adafactor", "HFAdafactor-beta1-lr", "SMMF", "SMMF-dense-adam"]


@pytest.mark.parametrize("clip", ["None", "0.1"])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fsdp2_matches_one_process(results, name, clip):
    assert outcome(results, f"fsdp-{name}-clip{clip}") <= RTOL


@pytest.mark.parametrize("name", ["Adafactor", "HFAdafactor-beta1-lr", "SMMF"])
def test_fsdp2_with_two_param_groups_matches_one_process(results, name):
    assert outcome(results, f"fsdp-{name}-groups") <= RTOL


@pytest.mark.parametrize("name", ["AdamW", "Adafactor", "SMMF"])
def test_hsdp_2d_mesh_matches_one_process(results, name):
    assert outcome(results, f"hsdp-{name}-clip0.1") <= RTOL


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("optimizer", ["AdamW", "Adafactor", "HFAdafactor-beta1-lr", "SMMF"])
def test_fsdp2_other_backends(results, optimizer, backend):
    name = f"fsdp-{optimizer}-clip0.1-{backend}"
    if backend == "triton" and name not in results:
        pytest.skip("triton runs on CPU tensors only under TRITON_INTERPRET=1")
    assert outcome(results, name) <= RTOL


@pytest.mark.parametrize("norm_type", ["2.0", "3.0", "inf"])
def test_clip_grad_norm_on_dtensor_grads(results, norm_type):
    # parameters after 20 clipped steps and every returned norm (a replicated DTensor)
    assert outcome(results, f"clip_grad_norm-{norm_type}") <= RTOL


@pytest.mark.parametrize(
    "name, without_clip",
    [("AdamW", 0), ("Adafactor", 2), ("HFAdafactor", 2), ("SMMF", 1)],
)
def test_collectives_per_step_do_not_grow_with_tensor_count(results, name, without_clip):
    # 2 and 8 sharded layers: the clip norm adds one all-reduce of a scalar; Adafactor's
    # statistics (sums of θ², column sums, sums of the new row statistics) go in one all-reduce,
    # the sums of U² in a second; SMMF's row and column sums of |M| and V of every param in one
    assert outcome(results, f"collectives-{name}-clip1.0") == [without_clip + 1] * 2
    assert outcome(results, f"collectives-{name}-clipNone") == [without_clip] * 2
    # two param groups: their sums go in the same all-reduces
    assert outcome(results, f"collectives-{name}-groups") == [without_clip] * 2


@pytest.mark.parametrize("name", ["AdamW", *FACTORED])
def test_full_state_dict_loads_into_one_process_and_back(results, name):
    assert outcome(results, f"state_dict_full-{name}") <= RTOL


@pytest.mark.parametrize("name", ["AdamW", *FACTORED])
def test_one_process_state_dict_loads_into_shards(results, name):
    assert outcome(results, f"load_one_process-{name}") <= RTOL


@pytest.mark.parametrize("name", ["AdamW", *FACTORED])
def test_dcp_save_load_resumes_bit_exactly(results, name):
    assert outcome(results, f"dcp-{name}") == 0.0


@pytest.mark.parametrize("name", ["AdamW", "Adafactor", "SMMF"])
def test_state_moves_between_one_process_and_fsdp2(results, name):
    # DCP checkpoints both ways and set_optimizer_state_dict(broadcast_from_rank0=True): SMMF's
    # state_dict packs signs in the param's dim-0 rows in both settings, so torch's paths that
    # copy by global shape (DCP, the broadcast) meet the same shapes
    assert outcome(results, f"cross-layout-{name}") <= RTOL


def test_smmf_state_layout_under_fsdp2(results):
    # factors whole and identical on every rank; the kernels' sign words those of the matrix
    # rows the rank's run touches, state_dict()'s split as the param is
    assert outcome(results, "smmf-state-layout") == []


def test_ddp_matches_one_process(results):
    assert outcome(results, "ddp-AdamW-clip0.1") <= RTOL


@pytest.mark.parametrize("name", ["AdamW", "Adafactor", "SMMF"])
def test_a_failing_group_stops_the_step_as_in_one_process(results, name):
    # [failing group 0, failing group 1] x [one process, FSDP2] x [sharded group stepped, plain group stepped]
    assert outcome(results, f"error-order-{name}") == [[[False, False]] * 2, [[True, False]] * 2]


def test_refusals(results):
    m = outcome(results, "refusals")
    assert m["partial param"].startswith("NotImplementedError") and "Partial" in m["partial param"]
    for key in ("replicated grad", "plain grad"):
        assert m[key].startswith("RuntimeError") and 'param_groups[0]["params"][0]' in m[key], m[key]
        assert "redistribute the grad" in m[key]
    assert m["param unchanged"] is True
    assert m["Shard(1) AdamW"] is None and m["Shard(1) AdamW max diff"] == 0.0
    for key in ("Shard(1) Adafactor", "Shard(1) SMMF"):
        assert m[key].startswith("NotImplementedError") and "Shard(0)" in m[key], m[key]
