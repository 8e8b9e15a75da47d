"""The scripts' argument and file faults, end to end: a bad argument of generate.py, embed.py
or train_toy.py is one `error:` line and a nonzero status, never a traceback, and it is
found before a model loads; damaged files, a closed stdout, a second run of a run directory
and a signal at any moment of a run end with one line too, and leave nothing half-written.

Most cases run in-process through `cli(argv)`; those that only show in `__main__` (argv
bytes, a closed pipe, a signal while the libraries load, a signal after the last step) run
as subprocesses, with SIGINT at a terminal's default disposition."""

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import embed as embed_script
import generate as generate_script
import pytest
import run_files
import run_signals
import toy_config
import train_toy

from mha_jax.interop import checkpoint_path
from mha_jax.models import bert, llama

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
TINY = ["steps=4", "log_every=2", "eval_every=4", "eval_size=16", "checkpoint_every=2", "warmup_steps=1"]
BERT_FOLDER = checkpoint_path("all-minilm-l6-v2").parent


def one_error_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert "Traceback" not in text
    return lines[0]


@contextlib.contextmanager
def terminal_sigint():
    """A child starts with SIGINT at its default disposition, as a shell starts a program,
    even where this process ignores SIGINT (a background job): a handled signal is reset at
    exec, an ignored one stays ignored. (preexec_fn would fork a multithreaded process.)"""
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_script(script: str, *argv, timeout=180, **options) -> subprocess.CompletedProcess:
    command = [sys.executable, f"scripts/{script}", *map(os.fsencode, argv)]
    options.setdefault("stdout", subprocess.PIPE)
    with terminal_sigint():
        return subprocess.run(command, cwd=ROOT, stderr=subprocess.PIPE, timeout=timeout, **options)


def spawn(script: str, *argv) -> subprocess.Popen:
    command = [sys.executable, f"scripts/{script}", *map(str, argv)]
    with terminal_sigint():
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def cli_without_keyboard_interrupt(script, argv: list[str]):
    """`script.cli(argv)`; a KeyboardInterrupt that escapes it fails the test (pytest would
    take it for the user's Ctrl-C and end the session)."""
    try:
        return script.cli(argv)
    except KeyboardInterrupt:
        pytest.fail(f"KeyboardInterrupt escaped {script.__name__}.cli")


# ---------------------------------------------------------------------------
# generate.py


@pytest.fixture
def no_model_loads(monkeypatch):
    """Every loader fails the test: these arguments must be refused before a model loads."""

    def refuse():
        raise AssertionError("the model was loaded")

    for name in list(generate_script.MODELS):
        monkeypatch.setitem(generate_script.MODELS, name, refuse)
    monkeypatch.setattr(bert, "load", lambda *_: refuse())


GENERATE_BAD_ARGV = [
    (["--prompt", "x", "--temperature", "nan"], r"--temperature must be finite and >= 0 .*; got nan"),
    (["--prompt", "x", "--temperature", "inf"], r"--temperature must be finite and >= 0 .*; got inf"),
    (["--prompt", "x", "--temperature", "-1"], r"--temperature must be finite"),
    (
        ["--prompt", "x", "--seed", str(2**70)],
        r"--seed must lie in \[0, 2\*\*32\) .*; got 1180591620717411303424",
    ),
    (["--prompt", "x", "--seed", "-1"], r"--seed must lie in \[0, 2\*\*32\)"),
    (
        ["--prompt", "x\udcff\udcfe"],
        r"--prompt must be UTF-8 text; got bytes that do not decode: b'x\\xff\\xfe'",
    ),
    (["--prompt", "x", "--temperature", "0.7", "--top-p", "nan"], r"--top-p must lie in \(0, 1\]; got nan"),
    (["--prompt", "x", "--temperature", "0.7", "--top-k", "0"], r"--top-k must be at least 1; got 0"),
    (["--prompt", "x", "--max-new-tokens", "0"], r"--max-new-tokens must be at least 1; got 0"),
    (["--prompt", " "], r"--prompt must not be empty"),
    (["--prompt", "x", "--top-p", "0.9"], r"give --temperature > 0 with them"),
    (["--prompt", "x", "--model", "gpt5"], r"argument --model: invalid choice: 'gpt5'"),
    (["--prompt", "x", "--seed", "one"], r"argument --seed: invalid int value: 'one'"),
    (["--prompt", "x", "--colour"], r"unrecognized arguments: --colour"),
    ([], r"the following arguments are required: --prompt"),
]


@pytest.mark.parametrize(
    "argv, message", GENERATE_BAD_ARGV, ids=[" ".join(a)[:40] or "none" for a, _ in GENERATE_BAD_ARGV]
)
def test_generate_bad_arguments_are_one_line_before_the_model_loads(no_model_loads, argv, message):
    outcome = generate_script.cli(argv)
    assert isinstance(outcome, str), outcome
    assert re.search(message, one_error_line(outcome)), outcome


@pytest.fixture(scope="module")
def smollm2():
    return llama.load(checkpoint_path("smollm2-135m-instruct"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--prompt", "Hi", "--temperature", "0.7", "--top-k", str(10**9)],
            r"--top-k must be at most the vocabulary size of smollm2 \(49152\); got 1000000000",
        ),
        (  # 8192 digits are 8192 tokens: the context, with no room for the new token
            ["--prompt", "1" * 8192, "--max-new-tokens", "1"],
            r"the prompt \(8192 tokens\) plus --max-new-tokens \(1\) must fit the 8192 positions of "
            r"smollm2; got 8193",
        ),
    ],
    ids=["top-k-above-the-vocabulary", "prompt-of-the-context-length"],
)
def test_generate_arguments_beyond_the_model_are_one_line(smollm2, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(generate_script.llama, "load", lambda path: smollm2)  # loaded once
    outcome = generate_script.cli(argv)
    assert isinstance(outcome, str) and re.search(message, one_error_line(outcome)), outcome
    assert capsys.readouterr().out == ""  # refused before anything is printed or compiled


def test_a_damaged_or_missing_checkpoint_is_one_line(monkeypatch):
    def missing():
        raise FileNotFoundError("checkpoint 'smollm2-135m-instruct' must be a file at /nowhere; got none")

    monkeypatch.setitem(generate_script.MODELS, "smollm2", missing)
    outcome = generate_script.cli(["--prompt", "Hi"])
    assert one_error_line(outcome) == (
        "error: checkpoint 'smollm2-135m-instruct' must be a file at /nowhere; got none"
    )


@pytest.mark.parametrize("script", [generate_script, embed_script], ids=["generate", "embed"])
def test_ctrl_c_anywhere_in_generate_or_embed_is_one_line_and_130(monkeypatch, capsys, script):
    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setitem(generate_script.MODELS, "smollm2", interrupted)
    monkeypatch.setattr(bert, "load", interrupted)
    argv = ["--prompt", "Hi"] if script is generate_script else ["Hi"]
    assert cli_without_keyboard_interrupt(script, argv) == 130
    assert one_error_line(capsys.readouterr().err) == "error: interrupted (SIGINT)"


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, message",
    [
        (
            [b"--prompt", b"caf\xe9"],
            r"--prompt must be UTF-8 text; got bytes that do not decode: b'caf\\xe9'",
        ),
        (["--prompt", "Hi", "--temperature", "nan"], r"--temperature must be finite and >= 0"),
    ],
    ids=["latin-1-prompt", "nan-temperature"],
)
def test_generate_bad_arguments_as_a_process(argv, message):
    result = run_script("generate.py", *argv)
    assert result.returncode == 1
    assert re.search(message, one_error_line(result.stderr.decode(errors="replace"))), result.stderr
    assert result.stdout == b""


@pytest.mark.slow
def test_generate_with_stdout_closed_early_stops_quietly():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte (`| head -c 0`)
    try:
        result = run_script("generate.py", "--prompt", "Hi", "--max-new-tokens", "2", stdout=write_end)
    finally:
        os.close(write_end)
    assert result.returncode == 141
    assert result.stderr == b""  # no BrokenPipeError traceback, and nothing compiled for nobody


# ---------------------------------------------------------------------------
# embed.py


def bert_folder(tmp_path: Path, *, without: str | None = None, truncated: str | None = None) -> Path:
    """The installed MiniLM folder's three files, linked into `tmp_path`; one may be left out
    or replaced by its first MB."""
    folder = tmp_path / "bert"
    folder.mkdir()
    for name in embed_script.FOLDER_FILES:
        if name == truncated:
            with open(BERT_FOLDER / name, "rb") as source:
                (folder / name).write_bytes(source.read(2**20))
        elif name != without:
            (folder / name).symlink_to(BERT_FOLDER / name)
    return folder


EMBED_BAD_ARGV = [
    (lambda tmp: [], r"give at least one sentence"),
    (
        lambda tmp: ["\udcff\udcfe"],
        r"sentence \[0\] must be UTF-8 text; got bytes that do not decode: b'\\xff\\xfe'",
    ),
    (lambda tmp: ["fine", "caf\udce9"], r"sentence \[1\] must be UTF-8 text; got bytes .*b'caf\\xe9'"),
    (lambda tmp: ["x", "--folder", str(tmp / "nowhere")], r"--folder must be a directory .*; got .*nowhere"),
    (
        lambda tmp: ["x", "--folder", str(bert_folder(tmp, without="tokenizer.json"))],
        r"--folder must hold config\.json, model\.safetensors, tokenizer\.json; got .*bert without "
        r"tokenizer\.json",
    ),
    (lambda tmp: ["x", "--colour"], r"unrecognized arguments: --colour"),
]


@pytest.mark.parametrize(
    "make_argv, message",
    EMBED_BAD_ARGV,
    ids=["none", "latin-1", "second", "no-folder", "no-tokenizer", "flag"],
)
def test_embed_bad_arguments_are_one_line_before_the_model_loads(
    no_model_loads, tmp_path, make_argv, message
):
    outcome = embed_script.cli(make_argv(tmp_path))
    assert isinstance(outcome, str), outcome
    assert re.search(message, one_error_line(outcome)), outcome


def test_embed_with_a_truncated_model_file_is_one_line_naming_it(tmp_path, capsys):
    folder = bert_folder(tmp_path, truncated="model.safetensors")
    outcome = embed_script.cli(["--folder", str(folder), "x"])
    assert isinstance(outcome, str) and "model.safetensors" in one_error_line(outcome), outcome
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_embed_bad_sentence_as_a_process():
    result = run_script("embed.py", "fine", b"\xff")
    assert result.returncode == 1 and result.stdout == b""
    line = one_error_line(result.stderr.decode(errors="replace"))
    assert line == r"error: sentence [1] must be UTF-8 text; got bytes that do not decode: b'\xff'"


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, argv",
    [
        ("generate.py", ["--prompt", "Hi"]),
        ("embed.py", ["Hi"]),
        ("train_toy.py", ["--config", SMOKE]),
    ],
    ids=["generate", "embed", "train_toy"],
)
def test_ctrl_c_while_a_script_starts_is_one_line_and_130(tmp_path, script, argv):
    if script == "train_toy.py":
        argv = [*argv, "--run-dir", tmp_path / "run", "--quiet"]
    process = spawn(script, *argv)
    try:
        time.sleep(1.5)  # the libraries are still loading
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert re.match(r"error: (interrupted \(SIGINT\)|SIGINT received)", one_error_line(err)), err
    assert out == "" and not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------
# train_toy.py: the config


def _duplicate_key(tmp: Path) -> list[str]:
    (tmp / "dup.yaml").write_text(SMOKE.read_text() + "steps: 80\n")  # line 18
    return ["--config", str(tmp / "dup.yaml")]


def _smoke(*overrides: str):
    return lambda tmp: ["--config", str(SMOKE), *(a for o in overrides for a in ("--set", o))]


TRAIN_BAD_ARGV = [
    (_smoke("num_heatmaps=-1"), r"num_heatmaps must lie in \[0, eval_size=64\] \(0 draws none\); got -1"),
    (_smoke("num_heatmaps=65"), r"num_heatmaps must lie in \[0, eval_size=64\]"),
    (_smoke("target=nan"), r"target must be an accuracy in \[0, 1\] \(for task 'recall'\); got nan"),
    (_smoke("target=1.5"), r"target must be an accuracy in \[0, 1\]"),
    (_smoke("task=teacher", "target=inf"), r"target must be a finite relative error >= 0 .*; got inf"),
    (_smoke(f"seed={2**70}"), r"seed must lie in \[0, 2\*\*32\) .*; got 1180591620717411303424"),
    (_smoke(f"eval_seed={2**64}"), r"eval_seed must lie in \[0, 2\*\*32\) .*; got 18446744073709551616"),
    (_smoke("seed=-1"), r"seed must lie in \[0, 2\*\*32\)"),
    (_smoke(f"eval_size={10**9}"), r"eval_size must be at most \d+ \(.* within 4 GiB\); got 1000000000"),
    (_duplicate_key, r"config file .*dup\.yaml must give each key once; got 'steps' on lines 9 and 18"),
    (lambda tmp: ["--colour"], r"unrecognized arguments: --colour"),
    (lambda tmp: ["--config"], r"argument --config: expected one argument"),
    (_smoke("task=caf\udce9"), r"--set must be UTF-8 text; got bytes that do not decode: b'task=caf\\xe9'"),
]


@pytest.mark.parametrize(
    "make_argv, message",
    TRAIN_BAD_ARGV,
    ids=[
        "heatmaps-negative",
        "heatmaps-above-eval",
        "target-nan",
        "target-above-1",
        "teacher-target-inf",
        "seed-2**70",
        "eval-seed-2**64",
        "seed-negative",
        "eval-size-10**9",
        "yaml-duplicate-key",
        "unknown-flag",
        "config-without-file",
        "latin-1-value",
    ],
)
def test_train_bad_config_is_one_line_before_anything_runs(tmp_path, make_argv, message):
    outcome = train_toy.cli([*make_argv(tmp_path), "--run-dir", str(tmp_path / "run"), "--quiet"])
    assert isinstance(outcome, str), outcome
    assert re.search(message, one_error_line(outcome)), outcome
    assert not (tmp_path / "run").exists()


def test_a_yaml_merge_may_override_a_key():
    text = "base: &base {steps: 4, seed: 1}\nrun:\n  <<: *base\n  steps: 8\n"
    assert toy_config.yaml.load(text, Loader=toy_config.UniqueKeyLoader)["run"] == {"steps": 8, "seed": 1}


# ---------------------------------------------------------------------------
# train_toy.py: damaged checkpoints, a run directory in use, signals


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run: checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train_toy.main(toy_config.load_config(SMOKE, TINY), run_dir=run_dir, quiet=True)
    return run_dir


def copy_of(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def restored_step(run_dir: Path) -> int:
    cfg = run_files.saved_config(run_dir)
    _, _, like = train_toy.initial_state(cfg)
    manager = run_files.checkpoint_manager(run_dir, cfg)
    try:
        return int(run_files.restore_latest(manager, like, run_dir).step)
    finally:
        manager.close()


def _without_item_folder(step_dir: Path) -> None:
    shutil.rmtree(step_dir / "default")


def _truncated_manifest(step_dir: Path) -> None:
    manifest = step_dir / "default" / "manifest.ocdbt"
    manifest.write_bytes(manifest.read_bytes()[:10])


@pytest.mark.parametrize(
    "damage", [_without_item_folder, _truncated_manifest], ids=["no-item-folder", "manifest"]
)
def test_resume_falls_back_past_a_damaged_newest_checkpoint_quietly(
    trained, tmp_path, capfd, monkeypatch, damage
):
    run_dir = copy_of(trained, tmp_path)
    damage(run_dir / "checkpoints" / "4")
    # A read that finishes into a closed event loop reports "Event loop is closed" through
    # sys.unraisablehook (on stderr in a script; pytest turns it into a warning): watch it.
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    capfd.readouterr()
    assert train_toy.cli(["--resume", str(run_dir), "--quiet", "--set", "steps=2"]) == 0  # nothing to train
    time.sleep(0.2)  # a read still in flight would report now
    err = capfd.readouterr().err
    assert re.search(
        r"the checkpoint at step 4 in .* could not be read \(.*\); restoring step 2 instead", err
    )
    assert "Traceback" not in err and not unraisable, [u.exc_value for u in unraisable]
    assert restored_step(run_dir) == 2  # the damaged one was set aside


def test_a_run_directory_in_use_refuses_a_second_run(trained, tmp_path):
    run_dir = copy_of(trained, tmp_path)
    before = sorted((p, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file())
    with open(run_dir / "run.lock", "a") as held:  # another run's open file: flock locks conflict
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for argv in (["--resume", str(run_dir)], ["--config", str(SMOKE), "--run-dir", str(run_dir)]):
            outcome = train_toy.cli([*argv, "--quiet"])
            assert isinstance(outcome, str), outcome
            assert re.search(
                rf"run directory {re.escape(str(run_dir))} must be free for this run; "
                r"got it in use by another run, which holds the lock .*run\.lock",
                one_error_line(outcome),
            ), outcome
    assert sorted((p, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()) == before
    assert train_toy.cli(["--resume", str(run_dir), "--quiet"]) == 0  # released: the next run may


def test_a_signal_during_start_up_ends_with_one_line_and_saves_nothing(tmp_path, monkeypatch, capsys):
    def initial_state(*args, **kwargs):  # Ctrl-C while the model is being built
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    real = train_toy.initial_state
    monkeypatch.setattr(train_toy, "initial_state", initial_state)
    handler = signal.getsignal(signal.SIGINT)
    run_dir = tmp_path / "run"
    assert (
        cli_without_keyboard_interrupt(train_toy, ["--config", str(SMOKE), "--run-dir", str(run_dir)]) == 130
    )
    captured = capsys.readouterr()
    assert one_error_line(captured.err) == (
        "error: SIGINT received before the first step: nothing was trained or saved "
        f"(run directory {run_dir})"
    )
    assert captured.out == "" and not (run_dir / "checkpoints").exists()
    assert signal.getsignal(signal.SIGINT) is handler  # put back


def _png_is_whole(path: Path) -> bool:
    return path.read_bytes().endswith(b"IEND\xaeB`\x82")


@pytest.mark.slow
def test_two_quick_sigints_in_training_save_once_and_leave_no_partial_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    settings = ["steps=1000000", "checkpoint_every=100000", "eval_every=100000", "warmup_steps=1"]
    process = spawn(
        "train_toy.py",
        "--config",
        SMOKE,
        "--run-dir",
        run_dir,
        "--quiet",
        *(a for s in settings for a in ("--set", s)),
    )
    try:
        for line in process.stdout:  # the loop is running
            if line.startswith("{"):
                break
        process.send_signal(signal.SIGINT)
        time.sleep(0.05)
        process.send_signal(signal.SIGINT)  # lands in the final save
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert re.search(
        r"^SIGINT received: checkpoint saved at step \d+ in .*; continue with --resume", out, re.M
    ), out
    assert not [p for p in (run_dir / "checkpoints").iterdir() if "tmp" in p.name]
    assert 0 < restored_step(run_dir) < 1000000


@pytest.mark.slow
def test_a_sigint_after_the_last_step_ends_with_one_line_and_whole_pictures(tmp_path):
    run_dir = tmp_path / "run"
    settings = [*TINY, "num_heatmaps=12"]  # a dozen pictures: a second or two of drawing
    process = spawn(
        "train_toy.py",
        "--config",
        SMOKE,
        "--run-dir",
        run_dir,
        "--quiet",
        *(a for s in settings for a in ("--set", s)),
    )
    try:
        while not (run_dir / "checkpoints" / "4").is_dir() and process.poll() is None:
            time.sleep(0.01)  # the last step's checkpoint is committed: the pictures are next
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert f"SIGINT received: training is done and saved at step 4 in {run_dir}" in out
    assert "done: " not in out  # the summary line of an uninterrupted run
    assert all(_png_is_whole(p) for p in run_dir.glob("*.png"))
    assert restored_step(run_dir) == 4


def test_a_closed_stdout_stops_the_run_as_a_signal_would(monkeypatch):
    def closed(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    pointed = []
    monkeypatch.setattr("builtins.print", closed)
    monkeypatch.setattr(train_toy.os, "dup2", lambda fd, fd2: pointed.append(fd2))  # not this process's
    received = {}
    run_signals.say('{"step": 2}', received)
    assert received == {"signal": signal.SIGPIPE} and pointed == [sys.stdout.fileno()]
