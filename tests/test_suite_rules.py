"""The suite's own rules (conftest.py): no test lets the CPU choose the precision; and the
repository's layout rules: no line over 120 characters, no file over 700 lines.

Every script that computes (it has --amp) is started through conftest.cli_argv, which
refuses a command line that leaves the precision to --amp auto; in this process the
hardware report is faked, so auto means fp32 here on every machine."""
import ast
import os

import pytest
import torch

import conftest
import utils
from conftest import UnpinnedPrecision, cli_argv, fp32, pinned_precision, torchrun_argv

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("script", conftest.PRECISION_SCRIPTS)
@pytest.mark.parametrize("args", [[], ["--amp", "auto"], ["--amp=auto"], ["--dataset_name", "x", "--resume"]])
def test_a_command_line_that_lets_the_cpu_choose_the_precision_is_refused(script, args):
    with pytest.raises(UnpinnedPrecision, match="name the precision"):
        cli_argv(script, *args)
    with pytest.raises(UnpinnedPrecision):
        torchrun_argv(2, script, *args)


@pytest.mark.parametrize("args,amp", [(["--amp", "none"], "none"), (["--amp=bf16"], "bf16"),
                                      (["x", "--amp", "fp16"], "fp16")])
def test_a_command_line_that_names_its_precision_is_accepted(args, amp):
    assert pinned_precision(args) == amp
    argv = cli_argv("cyclegan.py", *args)
    assert argv[1] == os.path.join(conftest.ROOT, "cyclegan.py") and argv[2:] == args


def test_scripts_without_a_precision_and_help_need_no_pin():
    assert cli_argv("export.py", "--checkpoint", "G.pth")[2:] == ["--checkpoint", "G.pth"]
    assert cli_argv("test.py", "--help")[2:] == ["--help"]


def test_fp32_pins_none_unless_a_precision_is_named():
    assert fp32(["--n_epochs", 1]) == ["--n_epochs", "1", "--amp", "none"]
    assert fp32(["--amp", "bf16"]) == ["--amp", "bf16"]


def test_in_process_the_faked_cpu_computes_no_bf16_so_auto_is_fp32():
    name, flags = utils.cpu_info()
    assert "faked" in name and not set(utils.NATIVE_BF16_FLAGS) & flags
    assert utils.pick_precision("auto", torch.device("cpu")) == (None, None)


def _subprocess_calls_outside_conftest():
    """(file, line) of every subprocess call in the tests whose argument list is written out
    with sys.executable, i.e. a Python script started without conftest.cli_argv."""
    found = []
    for name in sorted(os.listdir(TESTS)):
        if not name.endswith(".py") or name == "conftest.py":
            continue
        tree = ast.parse(open(os.path.join(TESTS, name)).read())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess" and node.args):
                continue
            first = node.args[0]
            if isinstance(first, ast.List) and any(isinstance(e, ast.Attribute) and e.attr == "executable"
                                                   for e in first.elts):
                found.append((name, node.lineno))
    return found


def test_no_test_starts_a_python_script_without_conftests_check():
    assert _subprocess_calls_outside_conftest() == []


def test_the_scan_finds_a_direct_call(tmp_path, monkeypatch):
    """The scan above can fail: a test file with a direct call is found."""
    (tmp_path / "test_bad.py").write_text("import subprocess, sys\n\n"
                                          "subprocess.run([sys.executable, 'cyclegan.py', '--n_epochs', '1'])\n")
    monkeypatch.setitem(globals(), "TESTS", str(tmp_path))
    assert _subprocess_calls_outside_conftest() == [("test_bad.py", 3)]


# -----------------------------------------------------------------------------
# The layout rules of issue 35, checked on the repository's own files

ROOT = os.path.dirname(TESTS)


def python_files():
    """Every .py file of the repository (not a virtual environment or a data folder inside it)."""
    skip = {".git", "data", "saved_models", "images", "venv", ".venv", "__pycache__"}
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in skip and not d.startswith(".")]
        yield from (os.path.join(folder, f) for f in files if f.endswith(".py"))
    yield from (os.path.join(ROOT, "data", f) for f in os.listdir(os.path.join(ROOT, "data")) if f.endswith(".py"))


def test_no_line_of_a_python_file_is_over_120_characters_and_no_file_over_700_lines():
    long_lines, long_files = [], []
    for path in python_files():
        lines = open(path, encoding="utf-8").read().splitlines()
        long_lines += [f"{os.path.relpath(path, ROOT)}:{k}" for k, line in enumerate(lines, 1) if len(line) > 120]
        if len(lines) > 700:
            long_files.append(f"{os.path.relpath(path, ROOT)} ({len(lines)} lines)")
    assert not long_lines and not long_files, (long_lines, long_files)
    assert sum(1 for _ in python_files()) > 20  # (the walk found the repository)


def test_the_loop_and_the_helpers_stay_within_their_sizes():
    sizes = {name: len(open(os.path.join(ROOT, name), encoding="utf-8").read().splitlines())
             for name in ("training.py", "utils.py")}
    assert sizes["training.py"] <= 650 and sizes["utils.py"] <= 450, sizes
