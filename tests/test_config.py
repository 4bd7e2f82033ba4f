"""Config loading: every bundled recipe loads, and bad keys, types and combinations stop with a named error."""

from importlib import resources

import pytest

from rwkvx_lightning.cli import main
from rwkvx_lightning.config import ConfigError, check_resumable, load_config, to_yaml


def bundled_recipes():
    return sorted(p.name for p in resources.files("rwkvx_recipes").iterdir() if p.name.endswith(".yaml"))


@pytest.mark.parametrize("name", bundled_recipes())
def test_every_bundled_recipe_loads(name):
    cfg = load_config(name)
    assert cfg.model.layout()


def test_overrides_apply_with_types():
    cfg = load_config("demo", ["trainer.max_steps=7", "run.dir=/tmp/x", "seed=3", "model.attn_positions=[0,2]", "model.n_attn=0"])
    assert (cfg.trainer.max_steps, cfg.run.dir, cfg.seed, cfg.model.attn_positions) == (7, "/tmp/x", 3, [0, 2])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.n_layr=3"], "unknown config key 'model.n_layr'.*did you mean 'model.n_layer'"),
        (["trainer.max_step=3"], "did you mean 'trainer.max_steps'"),
        (["modle.n_layer=3"], "unknown config key 'modle.n_layer'.*did you mean 'model.n_layer'"),
        (["trainer.max_steps=abc"], "trainer.max_steps"),
        (["optim.lr=fast"], "optim.lr"),
        (["model.n_attn=3"], "model.n_layer=4 is not a multiple of model.n_attn=3"),
        (["data.ctx_len=100"], "data.ctx_len=100: must be a multiple of model.chunk_size=32"),
        (["optim.schedule=linear"], "optim.schedule"),
        (["trainer.precision=fp8"], "trainer.precision"),
        (["optim.lr_final=1.0"], "optim.lr_final"),
        (["seed"], "not of the form key=value"),
        (["model.wkv_kernel.chunk_len=128"], "model.wkv_kernel: wkv7 chunk option chunk_len .* got 128"),
        (["model.wkv_kernel.checkpoint_chunk=1"], "model.wkv_kernel: unknown .*checkpoint_chunk"),
        (["model.attn_kernel.dkdv_bm=48"], "model.attn_kernel: .*dkdv_bm .* got 48"),
        (["model.wkv_kernl.checkpoint_chunks=1"], "unknown config key 'model.wkv_kernl.checkpoint_chunks'"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", overrides)


def test_kernel_options_from_recipe_and_overrides(tmp_path):
    """Kernel options are free-form mappings checked by the kernels themselves; they may change on resume."""
    recipe = tmp_path / "k.yaml"
    recipe.write_text("model:\n  wkv_kernel: {checkpoint_chunks: 1}\n")
    cfg = load_config(str(recipe), ["model.attn_kernel.dkdv_stages=2"])
    assert cfg.model.wkv_kernel == {"checkpoint_chunks": 1} and cfg.model.attn_kernel == {"dkdv_stages": 2}
    resumed = load_config("demo", ["model.wkv_kernel.checkpoint_chunks=1", "model.attn_kernel.dkdv_stages=2"])
    check_resumable(to_yaml(load_config("demo")), resumed, "runs/x")


def test_unknown_key_in_recipe_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  n_embed: 128\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.n_embed' in recipe r.yaml.*'model.n_embd'"):
        load_config(str(recipe))


def test_missing_recipe():
    with pytest.raises(ConfigError, match="recipe 'nope' not found"):
        load_config("nope")


def test_resume_check_allows_schedule_keys_and_refuses_shape_changes():
    saved = to_yaml(load_config("demo"))
    check_resumable(saved, load_config("demo", ["trainer.max_steps=999", "checkpoint.every_n_steps=7"]), "runs/x")
    with pytest.raises(ConfigError, match="another run's incompatible config.*model.n_embd: 128 -> 256"):
        check_resumable(saved, load_config("demo", ["model.n_embd=256"]), "runs/x")


def test_cli_print_config_and_errors(capsys):
    assert main(["train", "demo", "--print-config", "trainer.max_steps=5"]) == 0
    assert "max_steps: 5" in capsys.readouterr().out
    assert main(["train", "demo", "model.n_layr=2"]) == 2
    assert "did you mean 'model.n_layer'" in capsys.readouterr().err
