"""The way in: building (setup.py, pyproject.toml), importing (fused_optim._ext's warnings), the
Makefile's TORCH_SPEC handling and the bench chart. Most run a subprocess: a fresh interpreter is
the only way to see what `import fused_optim` or a build script does from scratch."""

import csv
import importlib.machinery
import importlib.util
import os
import re
import runpy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SETUP = runpy.run_path(str(ROOT / "setup.py"), run_name="fused_optim_setup")  # defs only: no build


def run_py(code: str, cwd, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    # Without TRITON_INTERPRET, so that the reference is the only backend left on CPU without _C.
    drop = ("PYTHONPATH", "FUSED_OPTIM_BACKEND", "TRITON_INTERPRET")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---- 1. no isolated build against another torch ---------------------------------------------------


def test_build_requirements_do_not_pull_torch():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requires = meta["build-system"]["requires"]
    assert not [r for r in requires if re.match(r"\s*torch\b", r)], requires
    assert any(re.match(r"\s*torch\b", d) for d in meta["project"]["dependencies"])


def test_setup_without_torch_stops_with_the_no_isolation_command():
    # As in pip's isolated build environment: torch cannot be imported.
    out = run_py(
        """
        import runpy, sys
        sys.modules["torch"] = None
        sys.argv = ["setup.py", "bdist_wheel"]
        runpy.run_path("setup.py", run_name="__main__")
        """,
        cwd=ROOT,
    )
    assert out.returncode != 0
    assert "cannot import torch" in out.stderr, out.stderr
    assert "pip install --no-build-isolation ." in out.stderr, out.stderr
    assert "pip install torch" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr


# ---- 2. CUDA architectures without a GPU -----------------------------------------------------------


def test_cuda_arch_list_defaults_when_no_gpu_is_visible():
    decide = SETUP["cuda_arch_decision"]
    assert SETUP["DEFAULT_CUDA_ARCH_LIST"] == "8.0;9.0"
    # Unset (or empty) and no GPU: torch would fail with an IndexError; the default is set.
    assert decide(None, []) == ("8.0;9.0", "sm_80, sm_90")
    assert decide("  ", []) == ("8.0;9.0", "sm_80, sm_90")
    # Unset with GPUs: torch's own choice (the visible GPUs) stands.
    assert decide(None, [(9, 0), (8, 6), (9, 0)]) == (None, "sm_86, sm_90")
    # Set by the user: left alone, GPU or not.
    assert decide("7.5;8.0+PTX", []) == (None, "sm_75, sm_80 (+PTX)")
    assert decide("9.0a", [(8, 0)]) == (None, "sm_90a")
    assert decide("Ampere", []) == (None, "Ampere")
    # "native" means the visible GPUs: with none, a clear error rather than torch's IndexError.
    assert decide("native", [(8, 0)]) == (None, "sm_80")
    with pytest.raises(SystemExit, match="no GPU is visible"):
        decide("native", [])


def test_scripts_compile_the_same_default_architectures():
    script = (ROOT / "scripts" / "check_cuda_compile.sh").read_text()
    compiled = re.findall(r"arch=compute_(\d+),code=sm_\d+", script)
    default = [a.replace(".", "") for a in SETUP["DEFAULT_CUDA_ARCH_LIST"].split(";")]
    assert compiled == default


# ---- 3. the torch version the extension was built against ------------------------------------------


def test_build_info_records_the_torch_version(tmp_path):
    src = SETUP["build_info_source"]("2.13.0+cu128", "12.8", True, "sm_80, sm_90")
    path = SETUP["write_build_info"](str(tmp_path / "fused_optim"), src)
    assert Path(path).name == "_build_info.py"
    info = runpy.run_path(path)
    assert info["TORCH_VERSION"] == "2.13.0+cu128"
    assert info["TORCH_CUDA_VERSION"] == "12.8" and info["WITH_CUDA"] is True
    assert info["CUDA_ARCHS"] == "sm_80, sm_90"


def test_build_info_is_untracked():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "check-ignore", "-q", "fused_optim/_build_info.py"], cwd=ROOT, capture_output=True
    )
    assert out.returncode == 0, "fused_optim/_build_info.py should be in .gitignore"


def copy_package(dest: Path, with_extension: bool, torch_version: str | None = None) -> Path:
    """A copy of the fused_optim package as pip would install it (triton_kernels inside), with or
    without the compiled _C, and with a _build_info.py recording `torch_version` if given."""
    pkg = dest / "fused_optim"
    keep_so = lambda d, names: [n for n in names if n.endswith(".so") and not with_extension]  # noqa: E731
    ignore = shutil.ignore_patterns("__pycache__", "_build_info.py")
    shutil.copytree(
        ROOT / "fused_optim", pkg, ignore=lambda d, names: set(ignore(d, names)) | set(keep_so(d, names))
    )
    shutil.copytree(ROOT / "triton_kernels", pkg / "triton_kernels", ignore=ignore)
    if torch_version is not None:
        (pkg / "_build_info.py").write_text(SETUP["build_info_source"](torch_version, None, False, None))
    return pkg


IMPORT_AND_REPORT = """
    import warnings
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        import fused_optim
        from fused_optim import _ext
    msgs = [str(x.message) for x in w if "fused_optim" in str(x.message)]
    print("FILE", fused_optim.__file__)
    print("COUNT", len(msgs))
    print("LOADED", _ext.load_error is None)
    print("BACKENDS", fused_optim.available_backends("cpu"))
    for m in msgs:
        print("MSG", m)
"""


def report(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    get = lambda key: next(li.split(" ", 1)[1] for li in lines if li.startswith(key + " "))  # noqa: E731
    msgs = [li.split(" ", 1)[1] for li in lines if li.startswith("MSG ")]
    return dict(file=get("FILE"), count=int(get("COUNT")), loaded=get("LOADED") == "True", msgs=msgs)


def test_version_mismatch_warns_once_with_both_versions_and_extension_loaded(tmp_path):
    if not list((ROOT / "fused_optim").glob("_C.*.so")):
        pytest.skip("fused_optim._C is not built in this tree")
    copy_package(tmp_path, with_extension=True, torch_version="1.0.0+other")
    r = report(run_py(IMPORT_AND_REPORT, cwd=tmp_path))
    assert r["file"].startswith(str(tmp_path))
    assert r["count"] == 1, r["msgs"]
    msg = r["msgs"][0]
    assert "1.0.0+other" in msg and torch.__version__ in msg, msg
    assert "pip install --no-build-isolation ." in msg and "-e ." in msg, msg


def test_version_mismatch_is_named_when_the_extension_fails_to_load(tmp_path):
    pkg = copy_package(tmp_path, with_extension=False, torch_version="1.0.0+other")
    # A _C that exists but cannot load, as one built against another torch (undefined symbol).
    (pkg / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"not an ELF file")
    r = report(run_py(IMPORT_AND_REPORT, cwd=tmp_path))
    assert r["count"] == 1 and not r["loaded"], r
    msg = r["msgs"][0]
    assert "native extension not available" in msg and "reference" in msg, msg
    assert "1.0.0+other" in msg and torch.__version__ in msg and "--no-build-isolation" in msg, msg


def test_matching_build_info_does_not_warn(tmp_path):
    if not list((ROOT / "fused_optim").glob("_C.*.so")):
        pytest.skip("fused_optim._C is not built in this tree")
    copy_package(tmp_path, with_extension=True, torch_version=torch.__version__)
    r = report(run_py(IMPORT_AND_REPORT, cwd=tmp_path))
    assert r["count"] == 0 and r["loaded"], r["msgs"]


# ---- 4. a source tree without a built extension ----------------------------------------------------


def assert_not_built_here_message(msg: str, pkg: Path) -> None:
    assert str(pkg) in msg, msg
    assert "no built extension" in msg, msg
    assert "pip install --no-build-isolation -e ." in msg, msg
    assert "circular import" not in msg and "partially initialized" not in msg, msg


def test_source_tree_without_extension_says_so(tmp_path):
    src = tmp_path / "clone"
    pkg = copy_package(src, with_extension=False)
    (src / "setup.py").write_text("# a source tree\n")
    r = report(run_py(IMPORT_AND_REPORT, cwd=src))  # sys.path[0]: the tree, then the venv's site-packages
    assert r["file"] == str(pkg / "__init__.py")
    assert r["count"] == 1 and not r["loaded"], r
    assert_not_built_here_message(r["msgs"][0], pkg)
    # fused_optim is installed in this venv (editable, from ROOT) in the usual setup: named as shadowed.
    from fused_optim import _ext

    if _ext.installed_copy(str(pkg)) is not None:
        assert "shadows the installed fused_optim" in r["msgs"][0] and "another directory" in r["msgs"][0]


def test_source_tree_shadowing_a_regular_install_names_it(tmp_path):
    # A non-editable install, faked: a site directory with the package and its dist-info.
    site = tmp_path / "site"
    installed = copy_package(site, with_extension=False)
    dist_info = site / "fused_optim-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fused_optim\nVersion: 0.1.0\n")
    (dist_info / "RECORD").write_text("")
    src = tmp_path / "clone"
    pkg = copy_package(src, with_extension=False)
    (src / "setup.py").write_text("# a source tree\n")
    r = report(run_py(IMPORT_AND_REPORT, cwd=src, env_extra={"PYTHONPATH": str(site)}))
    assert r["file"] == str(pkg / "__init__.py")
    assert r["count"] == 1 and not r["loaded"], r
    msg = r["msgs"][0]
    assert_not_built_here_message(msg, pkg)
    assert f"shadows the installed fused_optim at {installed}" in msg, msg
    assert "Run Python from another directory" in msg, msg


def test_blocked_extension_keeps_the_generic_warning():
    # tests/test_errors.py blocks _C through sys.modules: one warning, reference used, a pip command.
    block = 'import sys\nsys.modules["fused_optim._C"] = None\n'
    out = run_py(block + textwrap.dedent(IMPORT_AND_REPORT), cwd=ROOT)
    r = report(out)
    assert r["count"] == 1 and not r["loaded"], r
    assert "reference" in r["msgs"][0] and "pip install" in r["msgs"][0], r["msgs"]


# ---- 5. the Makefile: TORCH_SPEC on an existing venv, pinned tools ------------------------------------


FAKE_PYTHON = """\
#!/usr/bin/env bash
# Stands in for .venv/bin/python: logs pip calls, keeps the "installed torch" in a file.
state="$(dirname "$0")/torch-version"
if [[ "$1" == "-c" ]]; then [[ -f "$state" ]] && cat "$state" && exit 0; exit 1; fi
echo "$*" >>"$(dirname "$0")/pip.log"
if [[ "$3" == "uninstall" ]]; then rm -f "$state"; exit 0; fi
for a in "$@"; do [[ "$a" == "--fail" ]] && exit 1; done
for a in "$@"; do case "$a" in torch==*) echo "${a#torch==}" >"$state" ;; esac; done
"""


def test_make_torch_spec_takes_effect_on_an_existing_venv(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    py = tmp_path / "python"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    (tmp_path / "torch-version").write_text("2.13.0+cpu\n")  # a venv made before the record existed
    record, stamp, log = tmp_path / ".torch-spec", tmp_path / ".built", tmp_path / "pip.log"
    stamp.write_text("")
    # The script also removes the old build from the repo when torch changes: run it on a copy.
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "venv_torch.sh", repo / "scripts")
    (repo / "fused_optim").mkdir()

    def sync(spec):
        out = subprocess.run(
            ["bash", str(repo / "scripts" / "venv_torch.sh"), str(py), spec, str(record), str(stamp)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    # No record: the spec is installed (pip's no-op here) and recorded; the build is kept.
    out = sync("torch==2.13.0+cpu")
    assert "no record" in out and record.read_text() == "torch==2.13.0+cpu\n" and stamp.exists()
    assert os.path.getmtime(record) <= os.path.getmtime(stamp)  # make will not rebuild for it
    # Same spec: nothing installed.
    n = len(log.read_text().splitlines())
    assert "unchanged" in sync("torch==2.13.0+cpu")
    assert len(log.read_text().splitlines()) == n
    # Another spec, with pip options: torch reinstalled, record rewritten, rebuild forced.
    (repo / "fused_optim" / "_C.cpython-311-x86_64-linux-gnu.so").write_text("old")
    out = sync("torch==2.13.0+cu128 --index-url https://example.invalid/whl")
    assert "changed from 'torch==2.13.0+cpu'" in out and "rebuilt" in out, out
    calls = log.read_text().splitlines()[n:]
    assert calls[0].startswith("-m pip uninstall -y -q torch"), calls
    assert calls[1] == "-m pip install -q torch==2.13.0+cu128 --index-url https://example.invalid/whl", calls
    assert record.read_text() == "torch==2.13.0+cu128 --index-url https://example.invalid/whl\n"
    assert not stamp.exists() and not list((repo / "fused_optim").glob("_C.*"))
    # A spec that fails to install after torch was uninstalled: the record is gone, so the next
    # run with the previous spec reinstalls it instead of calling a venv without torch unchanged.
    cmd = [
        "bash",
        str(repo / "scripts" / "venv_torch.sh"),
        str(py),
        "torch==9 --fail",
        str(record),
        str(stamp),
    ]
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=60).returncode != 0
    assert not record.exists()
    out = sync("torch==2.13.0+cu128 --index-url https://example.invalid/whl")
    assert "unchanged" not in out and (tmp_path / "torch-version").read_text().strip() == "2.13.0+cu128"


def test_makefile_pins_the_lint_tools_and_installs_matplotlib():
    makefile = (ROOT / "Makefile").read_text()
    ruff = re.search(r"^RUFF_VERSION := (\S+)", makefile, re.M)
    assert ruff and "ruff==$(RUFF_VERSION)" in makefile
    assert re.search(r"^CLANG_FORMAT_VERSION := \d", makefile, re.M)
    assert re.search(r"^MATPLOTLIB_VERSION := \d", makefile, re.M)
    assert "matplotlib==$(MATPLOTLIB_VERSION)" in makefile
    assert "bench/plot.py" in makefile  # make bench draws the chart
    ruff_bin = Path(sys.executable).parent / "ruff"
    if ruff_bin.exists():  # the venv's ruff is the pinned one
        out = subprocess.run([str(ruff_bin), "--version"], capture_output=True, text=True)
        assert out.stdout.split()[-1] == ruff[1], (out.stdout, ruff[1])


# ---- 6. the bench chart --------------------------------------------------------------------------------


def write_bench_csv(path: Path) -> None:
    cols = ["device_name", "torch_version", "dtype", "case", "candidate", "median_ms", "p10_ms", "p90_ms"]
    cols += ["speedup_vs_torch_fused"]
    rows = [
        ("a", "fused_optim cpu", 60.0, 58.0, 65.0),
        ("a", "torch fused", 66.0, 64.0, 70.0),
        ("a", "torch for-loop", 300.0, 290.0, 330.0),
        ("b", "fused_optim cpu", 3.0, 2.9, 3.4),  # case b has no for-loop: its bars are centred
        ("b", "torch fused", 13.0, 12.5, 14.0),
    ]
    ref = {case: med for case, cand, med, _, _ in rows if cand == "torch fused"}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for case, cand, med, p10, p90 in rows:
            speedup = round(ref[case] / med, 3)
            w.writerow(["cpu", torch.__version__, "float32", case, cand, med, p10, p90, speedup])


def run_plot(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "plot.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_plot_writes_a_png(tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (make setup installs it)")
    data = tmp_path / "bench.csv"
    write_bench_csv(data)
    out = run_plot(data)
    assert out.returncode == 0, out.stderr
    png = tmp_path / "bench.png"
    assert png.exists() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_fails_without_data(tmp_path):
    out = run_plot(tmp_path / "missing.csv")
    assert out.returncode != 0 and "plot.py:" in out.stderr, out
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    out = run_plot(empty)
    assert out.returncode != 0 and "plot.py:" in out.stderr, out
    header_only = tmp_path / "header.csv"
    write_bench_csv(header_only)
    header_only.write_text(header_only.read_text().splitlines()[0] + "\n")
    out = run_plot(header_only)
    assert out.returncode != 0 and "no rows" in out.stderr, out
    assert not list(tmp_path.glob("*.png"))


def test_plot_speedup_axis_labels_are_plain():
    plot = runpy.run_path(str(ROOT / "bench" / "plot.py"), run_name="plot")
    assert [plot["tick_label"](y) for y in (0.5, 1.0, 2.0, 4.0, 16.0)] == ["0.5×", "1×", "2×", "4×", "16×"]
    ticks = plot["speedup_ticks"](0.2, 5.0)
    assert ticks[0] <= 0.2 and ticks[-1] >= 5.0 and 1.0 in ticks
    assert len(plot["speedup_ticks"](1e-3, 1e4)) <= 10
