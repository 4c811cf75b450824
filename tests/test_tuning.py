"""The "never slower" dispatch cache (fusedres.backends.tuning), on the CPU with a fake timer
and a fake card name; one GPU-marked test runs it for real through `auto`."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import fusedres
from fusedres import reference
from fusedres.backends import BACKENDS, Backend, log, select_backend, tuning
from fusedres.backends.inputs import ConvInputs


class FakeBackend(Backend):
    def __init__(self, name: str, fail: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.calls = 0

    def device_types(self):
        return ("*",)

    def not_supported_reasons(self, inputs):
        return []

    def conv_bias_act(self, inputs):
        self.calls += 1
        if self.fail:
            raise RuntimeError("no kernel image for this card")
        return reference.conv_bias_act(*inputs.args())


class FakeTimer:
    """Milliseconds per backend name; records what it timed."""

    def __init__(self, **ms: float) -> None:
        self.ms = ms
        self.timed: list[str] = []

    def __call__(self, name, fn):
        fn()
        self.timed.append(name)
        return self.ms[name]


def _args(n=2, c=4, dtype=torch.float32, channels_last=False, residual=False, relu=True, stride=1):
    x = torch.randn(n, c, 6, 6, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, c, 3, 3, dtype=dtype)
    b = torch.randn(8)
    p = (6 - 1) // stride + 1
    r = torch.randn(n, 8, p, p, dtype=dtype) if residual else None
    return [x, w, b, r, None, None, [stride, stride], [1, 1], [1, 1], 1, [1, 1], relu]


@pytest.fixture
def backends():
    return [FakeBackend("triton"), FakeBackend("torch")]


def _tuner(tmp_path, timer, device="Fake GPU 80GB"):
    return tuning.Tuner(timer=timer, device_name=lambda d: device, directory=tmp_path)


def _files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_times_once_then_reuses_memory_and_disk(tmp_path, backends):
    timer = FakeTimer(triton=2.0, torch=1.0)
    tuner = _tuner(tmp_path, timer)
    args = _args()
    assert tuner.choose(backends, ConvInputs(*args)) is backends[1]
    assert timer.timed == ["triton", "torch"]
    (name,) = _files(tmp_path)
    assert name.startswith("conv_bias_act-") and name.endswith(".json")
    data = json.loads((tmp_path / name).read_text())
    assert data["winner"] == "torch" and data["times_ms"] == {"triton": 2.0, "torch": 1.0}
    assert data["key"]["device"] == "Fake GPU 80GB"
    assert set(data["key"]["versions"]) >= {"torch", "triton", "cudnn", "fusedres"}
    # In memory: no timing, no disk access.
    assert tuner.choose(backends, ConvInputs(*_args())) is backends[1]
    # A fresh process (a new tuner) reads the file instead of timing.
    timer2 = FakeTimer(triton=1.0, torch=2.0)
    assert _tuner(tmp_path, timer2).choose(backends, ConvInputs(*_args())) is backends[1]
    assert timer.timed == ["triton", "torch"] and timer2.timed == []


@pytest.mark.parametrize("change", [
    pytest.param({"n": 3}, id="batch"),
    pytest.param({"c": 8}, id="channels"),
    pytest.param({"dtype": torch.float64}, id="dtype"),
    pytest.param({"channels_last": True}, id="memory-format"),
    pytest.param({"residual": True}, id="optional-tensor-present"),
    pytest.param({"relu": False}, id="relu"),
    pytest.param({"stride": 2}, id="conv-args"),
])
def test_key_separates_what_matters(tmp_path, change):
    tuner = _tuner(tmp_path, FakeTimer())
    base = tuner.key("conv_bias_act", _args(), ["triton", "torch"])
    assert tuner.path(base) == tuner.path(tuner.key("conv_bias_act", _args(), ["triton", "torch"]))
    assert tuner.path(base) != tuner.path(tuner.key("conv_bias_act", _args(**change), ["triton", "torch"]))


def test_key_separates_cards_versions_and_flags(tmp_path, monkeypatch):
    args = _args()
    a = _tuner(tmp_path, FakeTimer(), "Card A").key("conv_bias_act", args)
    assert a != _tuner(tmp_path, FakeTimer(), "Card B").key("conv_bias_act", args)
    monkeypatch.setattr(fusedres, "__version__", "99.0")
    b = _tuner(tmp_path, FakeTimer(), "Card A").key("conv_bias_act", args)
    assert a != b and b["versions"]["fusedres"] == "99.0"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", not torch.backends.cudnn.allow_tf32)
    assert b != _tuner(tmp_path, FakeTimer(), "Card A").key("conv_bias_act", args)


def test_two_writers_leave_one_valid_file(tmp_path):
    """Processes tuning the same shape at once each write a whole file (temp file in the same
    folder + os.replace): readers never see a partial file, the last writer wins and no
    temp files remain. Threads stand in for processes (os.replace is atomic either way)."""
    import threading

    writers = [_tuner(tmp_path, FakeTimer()) for _ in range(4)]
    key = writers[0].key("conv_bias_act", _args(), ["triton", "torch"])
    path = writers[0].path(key)
    stop, seen, bad = threading.Event(), set(), []

    def write(i):
        for j in range(50):
            winner = ("triton", "torch")[(i + j) % 2]
            writers[i]._write(path, key, winner, {"triton": float(i), "torch": float(j)})

    def read():
        reader = _tuner(tmp_path, FakeTimer())
        by_name = {"triton": None, "torch": None}
        while not stop.is_set():
            if path.exists():
                winner = reader._read(path, key, by_name)
                (seen if winner else bad).add(winner)

    reader_thread = threading.Thread(target=read)
    reader_thread.start()
    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    reader_thread.join()
    assert not bad and seen <= {"triton", "torch"}
    assert _files(tmp_path) == [path.name]
    assert json.loads(path.read_text())["winner"] in ("triton", "torch")


def test_second_writer_reads_the_first_writers_file(tmp_path, backends):
    a_timer, b_timer = FakeTimer(triton=1.0, torch=2.0), FakeTimer(triton=3.0, torch=2.0)
    _tuner(tmp_path, a_timer).choose(backends, ConvInputs(*_args()))
    assert _tuner(tmp_path, b_timer).choose(backends, ConvInputs(*_args())).name == "triton"
    assert b_timer.timed == []


@pytest.mark.parametrize("content", [
    pytest.param("{not json", id="corrupt"),
    pytest.param("", id="empty"),
    pytest.param('["a list"]', id="wrong-type"),
    pytest.param(None, id="another-key"),
    pytest.param(None, id="unknown-winner"),
])
def test_bad_cache_file_is_ignored_and_rewritten(tmp_path, backends, content, request):
    tuner = _tuner(tmp_path, FakeTimer(triton=1.0, torch=2.0))
    args = _args()
    key_args = ConvInputs(*args).args()  # the op's arguments as the tuner keys them (defaults included)
    path = tuner.path(tuner.key("conv_bias_act", key_args, ["triton", "torch"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    if request.node.callspec.id == "another-key":
        content = json.dumps({"key": {"op": "something else"}, "winner": "torch"})
    elif request.node.callspec.id == "unknown-winner":
        key = json.loads(json.dumps(tuner.key("conv_bias_act", key_args, ["triton", "torch"])))
        content = json.dumps({"key": key, "winner": "cuda"})
    path.write_text(content)
    assert tuner.choose(backends, ConvInputs(*args)).name == "triton"
    data = json.loads(path.read_text())
    assert data["winner"] == "triton" and data["key"]["op"] == "conv_bias_act"


def test_unwritable_cache_still_works_in_memory(tmp_path, backends):
    blocker = tmp_path / "file"
    blocker.write_text("")
    timer = FakeTimer(triton=1.0, torch=2.0)
    tuner = _tuner(blocker / "sub", timer)  # mkdir fails: a file is in the way
    assert tuner.choose(backends, ConvInputs(*_args())).name == "triton"
    assert tuner.choose(backends, ConvInputs(*_args())).name == "triton"
    assert timer.timed == ["triton", "torch"]


def test_cache_location_from_environment(tmp_path, monkeypatch, backends):
    monkeypatch.setenv("FUSEDRES_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.cache_dir() == tmp_path / "explicit" / "dispatch"
    tuner = tuning.Tuner(timer=FakeTimer(triton=1.0, torch=2.0), device_name=lambda d: "Fake")
    tuner.choose(backends, ConvInputs(*_args()))
    assert len(_files(tmp_path / "explicit" / "dispatch")) == 1
    monkeypatch.delenv("FUSEDRES_CACHE_DIR")
    assert tuning.cache_dir() == tmp_path / "xdg" / "fusedres" / "dispatch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tuning.cache_dir() == tmp_path / "home" / ".cache" / "fusedres" / "dispatch"


def test_one_log_line_per_tuned_shape(tmp_path, backends, caplog):
    caplog.set_level(logging.INFO, logger="fusedres")
    tuner = _tuner(tmp_path, FakeTimer(triton=0.5, torch=0.75))
    for _ in range(3):
        tuner.choose(backends, ConvInputs(*_args()))
    _tuner(tmp_path, FakeTimer()).choose(backends, ConvInputs(*_args()))  # from disk: not tuned again
    lines = [r.getMessage() for r in caplog.records if r.name == "fusedres"]
    assert len(lines) == 1, lines
    assert lines[0].startswith("fusedres: tuned conv_bias_act Fake GPU 80GB float32[2,4,6,6] float32[8,4,3,3]")
    assert "triton 0.5000 ms, torch 0.7500 ms -> triton (cached in" in lines[0]
    tuner.choose(backends, ConvInputs(*_args(n=3)))
    assert len([r for r in caplog.records if r.name == "fusedres"]) == 2


def test_log_line_is_seen_without_logging_configured(tmp_path, backends, monkeypatch, capsys):
    """With no handler anywhere, a stderr handler is attached to "fusedres", once."""
    logger = logging.getLogger("fusedres")
    saved_handlers, saved_level = list(logger.handlers), logger.level
    monkeypatch.setattr(log, "_handler_checked", False)
    monkeypatch.setattr(logger, "hasHandlers", lambda: False)
    monkeypatch.setattr(logger, "propagate", False)  # keep pytest's own capture out of it
    logger.handlers = []
    logger.setLevel(logging.NOTSET)
    try:
        tuner = _tuner(tmp_path, FakeTimer(triton=1.0, torch=2.0))
        tuner.choose(backends, ConvInputs(*_args()))
        tuner.choose(backends, ConvInputs(*_args()))
        tuner.choose(backends, ConvInputs(*_args(n=3)))
        assert len(logger.handlers) == 1 and isinstance(logger.handlers[0], logging.StreamHandler)
        assert logger.level == logging.INFO
        assert capsys.readouterr().err.count("fusedres: tuned conv_bias_act") == 2
    finally:
        logger.handlers = saved_handlers
        logger.setLevel(saved_level)


def test_never_times_while_compiling(tmp_path, backends, monkeypatch):
    timer = FakeTimer(triton=2.0, torch=1.0)
    tuner = _tuner(tmp_path, timer)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert tuner.choose(backends, ConvInputs(*_args())) is backends[0]  # no winner known: triton
    assert timer.timed == [] and _files(tmp_path) == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert tuner.choose(backends, ConvInputs(*_args())) is backends[1]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _tuner(tmp_path, timer).choose(backends, ConvInputs(*_args())) is backends[1]  # cached winner
    assert timer.timed == ["triton", "torch"]


def test_never_times_fake_tensors(tmp_path, backends):
    from torch._subclasses.fake_tensor import FakeTensorMode

    timer = FakeTimer(triton=2.0, torch=1.0)
    with FakeTensorMode():
        args = _args()
        assert _tuner(tmp_path, timer).choose(backends, ConvInputs(*args)) is backends[0]
    assert timer.timed == []


def test_failing_candidate_loses(tmp_path, caplog):
    broken, working = FakeBackend("triton", fail=True), FakeBackend("torch")
    tuner = _tuner(tmp_path, FakeTimer(triton=0.1, torch=1.0))
    with caplog.at_level(logging.WARNING, logger="fusedres"):
        assert tuner.choose([broken, working], ConvInputs(*_args())) is working
    assert any("failed on the 'triton' backend while tuning" in r.getMessage() for r in caplog.records)


def test_select_backend_consults_the_tuner_only_for_auto(tmp_path, monkeypatch):
    """The wiring in select_backend: pretend triton targets the CPU and the CPU is tuned."""
    triton = BACKENDS["triton"]
    timer = FakeTimer(triton=2.0, torch=1.0)
    monkeypatch.setattr(tuning, "TUNER", _tuner(tmp_path, timer))
    monkeypatch.setattr(type(triton), "device_types", lambda self: ("cuda", "cpu"))
    monkeypatch.setattr(tuning, "wants_tuning", lambda device_type: tuning.ENABLED)
    inputs = ConvInputs(*_args())
    assert select_backend("auto", inputs, tune=True) is BACKENDS["torch"]
    assert timer.timed == ["triton", "torch"]
    assert select_backend("auto", inputs) is triton  # tune=False: priority order
    assert select_backend("triton", inputs, tune=True) is triton  # explicit: never tuned
    monkeypatch.setenv("FUSEDRES_BACKEND", "triton")  # the same as backend="triton"
    assert select_backend("auto", ConvInputs(*_args(n=3)), tune=True) is triton
    monkeypatch.setattr(tuning, "ENABLED", False)
    monkeypatch.delenv("FUSEDRES_BACKEND")
    assert select_backend("auto", ConvInputs(*_args(n=3)), tune=True) is triton
    assert timer.timed == ["triton", "torch"]


def test_wants_tuning_only_on_cuda_and_the_env_variable_does_not_change_it(monkeypatch):
    """$FUSEDRES_BACKEND means what backend= means: an explicit backend is never raced against
    the others (select_backend), but the triton backend's own conv-backward choice is still
    tuned, however triton was chosen."""
    assert tuning.wants_tuning("cuda") and not tuning.wants_tuning("cpu")
    monkeypatch.setenv("FUSEDRES_BACKEND", "triton")
    assert tuning.wants_tuning("cuda")
    monkeypatch.setattr(tuning, "ENABLED", False)
    assert not tuning.wants_tuning("cuda")


@pytest.mark.gpu
def test_auto_tunes_on_a_real_gpu(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="fusedres")
    monkeypatch.setenv("FUSEDRES_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "TUNER", tuning.Tuner())
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _args(n=8, c=64, dtype=torch.float16,
                                                                          channels_last=True, residual=True)]
    args[1] = torch.randn(8, 64, 3, 3, device="cuda", dtype=torch.float16) * 0.05
    out = fusedres.ops.conv_bias_act(*args, "auto")
    out2 = fusedres.ops.conv_bias_act(*args, "auto")
    lines = [r.getMessage() for r in caplog.records if "tuned conv_bias_act" in r.getMessage()]
    assert len(lines) == 1 and torch.cuda.get_device_name() in lines[0]
    (path,) = (tmp_path / "dispatch").iterdir()
    data = json.loads(path.read_text())
    assert data["winner"] in ("triton", "torch") and set(data["times_ms"]) == {"triton", "torch"}
    expected = reference.conv_bias_act(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
    for o in (out, out2):
        torch.testing.assert_close(o.double(), expected, atol=2e-2, rtol=2e-2)


def test_auto_does_not_time_the_same_convolution_twice(tmp_path, monkeypatch):
    """The cuda backend's eval convolution is the torch backend's code: only its owner is timed."""
    triton = BACKENDS["triton"]
    timer = FakeTimer(triton=2.0, torch=1.0, cuda=1.0)
    monkeypatch.setattr(tuning, "TUNER", _tuner(tmp_path, timer))
    monkeypatch.setattr(type(triton), "device_types", lambda self: ("cuda", "cpu"))
    monkeypatch.setattr(type(BACKENDS["cuda"]), "targets", lambda self, device_type: True)
    monkeypatch.setattr(type(BACKENDS["cuda"]), "not_supported_reasons", lambda self, inputs: [])
    monkeypatch.setattr(tuning, "wants_tuning", lambda device_type: True)
    assert select_backend("auto", ConvInputs(*_args()), tune=True) is BACKENDS["torch"]
    assert timer.timed == ["triton", "torch"]
