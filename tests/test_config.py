"""gin bindings that nothing reads, the dry run, and the mesh's suggestion."""

import os

import gin
import pytest

from flanjax import cli, config
from flanjax.sharding import MeshConfig, MeshError

TINY_RUN = ["--gin_file=tests/tiny_run.gin"]


@pytest.fixture(autouse=True)
def _fresh_gin():
    import tasks.quickstart  # noqa: F401  registers the tasks the tiny run uses

    gin.clear_config(clear_constants=True)
    yield
    gin.clear_config(clear_constants=True)


def train(model_dir, *extra) -> int:
    return cli.main(["train", *TINY_RUN, f"--gin.MODEL_DIR={model_dir}", "--gin.TRAIN_STEPS=2", *extra])


def test_a_misspelt_macro_stops_the_run_naming_the_nearest_name(tmp_path, capsys):
    assert train(tmp_path / "run", "--gin.BATCH_SIZEE=4") == 2
    err = capsys.readouterr().err
    assert "BATCH_SIZEE" in err and "did you mean BATCH_SIZE?" in err
    assert not (tmp_path / "run").exists()  # stopped before anything was built or written


def test_a_setting_of_something_the_run_never_builds_is_refused(tmp_path, capsys):
    # A run that knows the evaluator but trains without it: the setting would be ignored.
    (tmp_path / "knows.gin").write_text(
        "from __gin__ import dynamic_registration\nfrom flanjax.eval import evaluator\nevaluator.EvalConfig.batch_size = 8\n")
    assert train(tmp_path / "run", f"--gin_file={tmp_path / 'knows.gin'}", "--gin.evaluator.EvalConfig.num_examples=5") == 2
    err = capsys.readouterr().err
    assert "evaluator.EvalConfig (batch_size, num_examples): this run never builds it" in err
    assert "nothing refers to @evaluator.EvalConfig()" in err


def _parse(text: str, *bindings: str) -> None:
    gin.clear_config(clear_constants=True)
    path = os.path.join(config.REPO_ROOT, "tests", ".unread_test.gin")
    try:
        with open(path, "w") as f:
            f.write(text)
        config.parse_gin([path], list(bindings))
    finally:
        os.remove(path)


RUN_FILE = """
from __gin__ import dynamic_registration
from flanjax.train import loop
from flanjax.train import optim
from flanjax.train import lm

STEPS = 10
LOG = 5
UNUSED = 3
lm.train.loop = @loop.LoopConfig()
lm.train.optimizer = {"nested": [@optim.OptimizerConfig()]}
loop.LoopConfig:
  num_steps = %STEPS
  log_every = %LOG
optim.OptimizerConfig.learning_rate = 0.1
"""


def test_unread_bindings_follow_references_through_nested_values_and_macros():
    _parse(RUN_FILE)
    unread = config.unread_bindings("flanjax.train.lm.train")
    assert unread == [("UNUSED", "gin.macro")]  # OptimizerConfig is reached inside a dict of lists
    with pytest.raises(config.ConfigError, match="UNUSED: a macro that no binding refers to"):
        config.check_bindings("flanjax.train.lm.train")


def test_an_override_that_orphans_a_file_macro_is_no_mistake():
    # --gin.loop.LoopConfig.log_every=2 leaves LOG unread: the user overrode what used it.
    _parse(RUN_FILE.replace("UNUSED = 3\n", ""), "loop.LoopConfig.log_every = 2")
    assert ("LOG", "gin.macro") in config.unread_bindings("flanjax.train.lm.train")
    config.check_bindings("flanjax.train.lm.train")  # no error
    _parse(RUN_FILE.replace("UNUSED = 3\n", ""), "STEPZ = 2")
    with pytest.raises(config.ConfigError, match="did you mean STEPS"):
        config.check_bindings("flanjax.train.lm.train")


def test_dry_run_compiles_prints_the_operative_config_and_writes_nothing(tmp_path, capsys):
    assert train(tmp_path / "run", "--dry_run") == 0
    out, err = capsys.readouterr()
    assert "TRAIN_STEPS = 2" in out and "lm.train.model_dir = %MODEL_DIR" in out  # the operative config
    assert "Compiled train step, per device:" in err and "Dry run of: Training" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "sizes, devices, suggestion",
    [
        (dict(data=-1, tensor=3), 8, "MeshConfig.tensor=2"),  # the axis that does not divide, not data=-1
        (dict(data=4, tensor=4, fsdp=1), 8, "MeshConfig.tensor=2"),  # each divides, the product does not
        (dict(data=1, fsdp=-1, tensor=2), 1, "MeshConfig.tensor=1"),
        (dict(data=2, fsdp=2, tensor=1), 8, "MeshConfig.data=-1"),  # too few devices used
    ],
)
def test_mesh_error_suggests_the_axis_to_change(sizes, devices, suggestion):
    with pytest.raises(MeshError, match=f"--gin.sharding.{suggestion}"):
        MeshConfig(**sizes).resolve(devices)
    fixed = suggestion.split(".")[-1].split("=")
    if fixed[1] != "-1":  # the suggestion works
        MeshConfig(**{**sizes, fixed[0]: int(fixed[1])}).resolve(devices)
