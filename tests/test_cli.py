"""The ``sparge`` command line: every subcommand, its output and its exit status."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import sparge
from sparge import cli, settings


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparge", *args], capture_output=True,
                          text=True, timeout=600)


def test_info(capsys, monkeypatch):
    monkeypatch.setenv("SPARGE_LAUNCH_CACHE", "0")
    monkeypatch.delenv("SPARGE_AUTOTUNE", raising=False)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    # the settings in effect, a variable that is not set at its default
    assert "SPARGE_LAUNCH_CACHE=0  (off:" in out and "SPARGE_AUTOTUNE=1  (on:" in out
    assert f"torch           {torch.__version__}" in out
    assert re.search(r"^triton\s+\S+", out, re.M)
    for entry in cli.ENTRY_POINTS:
        assert re.search(rf"cpu\s+{entry}\s+-> reference", out)
    assert "why: PyTorch reference: no Triton kernels for device type 'cpu'" in out


def test_python_dash_m_and_version():
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"sparge {sparge.__version__}"
    proc = run("info")
    assert proc.returncode == 0 and "execution path" in proc.stdout


def test_no_command_is_an_error():
    proc = run()
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_demo_quick():
    proc = run("demo", "--quick", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "1024 tokens" in out
    for step in ("[1/3]", "[2/3]", "[3/3]"):
        assert step in out
    sparsity = float(re.search(r"^sparsity\s+([0-9.]+)", out, re.M).group(1))
    error = float(re.search(r"^relative L1 error\s+([0-9.]+)", out, re.M).group(1))
    assert 0.1 < sparsity < 1.0
    assert error < 0.05
    assert re.search(r"^time\s+sparge [0-9.]+ ms vs SDPA [0-9.]+ ms", out, re.M)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_demo_on_the_gpu_reports_its_first_call():
    """On the GPU the first call, which compiles and tunes the kernels, is timed and reported
    apart from the timed calls."""
    proc = run("demo", "--quick", "--device", "cuda")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "(triton path," in out
    assert re.search(r"first call \(compiles and tunes the kernels; .*\) \.\.\. [0-9.]+ s$", out,
                     re.M), out
    error = float(re.search(r"^relative L1 error\s+([0-9.]+)", out, re.M).group(1))
    assert error < 0.05
    assert re.search(r"^time\s+sparge [0-9.]+ ms vs SDPA [0-9.]+ ms", out, re.M)


def test_demo_size_options(capsys):
    assert cli.main(["demo", "--seq-len", "700", "--heads", "2", "--head-dim", "32",
                     "--height", "8", "--width", "16", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "700 tokens (frames of 8x16, 6 frames), 2 heads, head dim 32" in out
    assert re.search(r"per head: [0-9.]+, [0-9.]+\)", out)


def test_demo_rejects_bad_sizes(capsys):
    assert cli.main(["demo", "--seq-len", "0"]) == 2
    assert "--seq-len must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("options,message", [
    (["--head-dim", "33"], "--head-dim must be even and at most 256, got 33"),
    (["--head-dim", "512"], "--head-dim must be even and at most 256, got 512"),
    (["--cdf-threshold", "1.5"], "--cdf-threshold must be in (0, 1], got 1.5"),
    (["--cdf-threshold", "nan"], "--cdf-threshold must be in (0, 1], got nan"),
    (["--sim-threshold", "inf"], "--sim-threshold must be finite, got inf"),
    (["--seq-len", "4096"], "--quick sets the size"),  # was ignored
])
def test_demo_rejects_bad_options_before_any_work(capsys, monkeypatch, options, message):
    """Found before the inputs are built and exact attention runs, as one line instead of a
    traceback from sparse_attn after that work."""
    monkeypatch.setattr(cli, "video_like_qkv", lambda *a, **k: pytest.fail("work was done"))
    assert cli.main(["demo", "--quick", "--device", "cpu", *options]) == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_video_like_qkv_is_deterministic_and_local():
    q, k, v = cli.video_like_qkv(500, 2, 32, height=8, width=16, seed=7)
    assert q.shape == k.shape == v.shape == (1, 2, 500, 32)
    again = cli.video_like_qkv(500, 2, 32, height=8, width=16, seed=7)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), again, strict=True))
    # attention concentrates near the diagonal: most of each row's mass within 64 tokens
    p = torch.softmax(q[0, 0] @ k[0, 0].T / 32 ** 0.5, dim=-1)
    i = torch.arange(500)
    near = ((i[:, None] - i[None, :]).abs() <= 64).float()
    assert (p * near).sum(-1).mean() > 0.5


def test_selftest_passes():
    proc = run("selftest", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(lines) >= 15 and all(line.startswith("PASS") for line in lines)
    for name in ("quantized_attn", "sparse_attn CDF", "sparse_attn top-k", "block_sparse_attn",
                 "predict_mask", "spas_sage_attn_meansim", "spas_sage2_attn_meansim_topk_cuda",
                 "block_sparse_sage2_attn_cuda, mask_id 128x64",
                 "block_sparse_sage2_attn_cuda, mask_id 64x128"):
        assert any(name in line for line in lines), name
    assert re.search(r"rel L1 = [0-9.e-]+ \(<= 0.05\)", proc.stdout)
    assert "all" in proc.stdout.splitlines()[-1] and "passed" in proc.stdout


def test_selftest_reports_failures(monkeypatch, capsys):
    real = sparge.quantized_attn

    def broken(q, k, v, **kwargs):
        return real(q, k, v, **kwargs) * 1.5

    monkeypatch.setattr(sparge, "quantized_attn", broken)
    monkeypatch.setattr(sparge, "predict_mask", lambda *a, **k: 1 / 0)
    assert cli.main(["selftest", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^FAIL  quantized_attn quant='none' vs SDPA\s+rel L1 = 0\.5", out, re.M)
    assert "FAIL  predict_mask: ZeroDivisionError" in out
    assert re.search(r"^PASS  block_sparse_attn", out, re.M)
    assert re.search(r"^\d+ of \d+ checks FAILED$", out, re.M)


@pytest.mark.parametrize(("options", "tuned"), [((), False), (("--tune",), True)])
def test_selftest_tunes_only_when_asked(options, tuned, monkeypatch, capsys):
    """By default the checks run each shape's default kernel configuration (less to compile on a
    first run); --tune times the configurations as calls do. The setting is restored after."""
    monkeypatch.setenv(settings.AUTOTUNE.name, "1")
    seen = []

    def checks(*args):
        return [("autotune", lambda: seen.append(settings.AUTOTUNE.enabled()) or [])]

    monkeypatch.setattr(cli, "selftest_checks", checks)
    assert cli.main(["selftest", "--device", "cpu", *options]) == 0
    assert seen == [tuned]
    assert os.environ[settings.AUTOTUNE.name] == "1"


def test_selftest_check_line():
    assert cli.Check("x", 0.01, 0.05).passed
    assert not cli.Check("x", 0.06, 0.05).passed
    assert not cli.Check("x", float("nan"), 0.05).passed
    assert cli.Check("s", 0.3, 0.2, "sparsity", above=True).line().startswith("PASS")
    assert "(>= 0.2)" in cli.Check("s", 0.1, 0.2, "sparsity", above=True).line()


@pytest.mark.parametrize("command", ["demo", "selftest"])
@pytest.mark.parametrize("device", ["foo", "cuda:x", "meta"])
def test_a_device_that_is_not_cpu_or_cuda_is_a_clear_error(command, device):
    with pytest.raises(SystemExit, match=f"--device {device}: expected auto, cpu, cuda or cuda:N"):
        cli.main([command, "--device", device])


@pytest.mark.parametrize("device", ["cuda:0"])
def test_cuda_device_without_cuda_is_a_clear_error(device):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = run("demo", "--quick", "--device", device)
    assert proc.returncode != 0 and "CUDA is not available" in proc.stderr
