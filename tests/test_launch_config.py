"""`python -m launch --config FILE`: a YAML recipe of one's own as the base of overrides, submissions and sweeps."""

from __future__ import annotations

import pytest

from launch.__main__ import main
from tests.test_launch import submissions_without_a_cluster


def test_a_yaml_recipe_of_ones_own_is_submitted_and_swept(tmp_path, monkeypatch, capsys) -> None:
    """--config FILE: a recipe written as YAML (here --print-config's output, edited) is the base the overrides,
    the submission and a sweep start from; --recipe beside it is refused."""
    import yaml

    from launch.sweep import expand
    from train.config import RunConfig

    assert main(["--recipe", "mnist_open_distarc", "--print-config"]) == 0
    mine = yaml.safe_load(capsys.readouterr().out)
    mine["name"], mine["optim"]["lr"] = "mine", 0.00123
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(mine, sort_keys=False))
    submitted = submissions_without_a_cluster(monkeypatch)
    overrides = [f"run_root={tmp_path}", f"data.root={tmp_path / 'digits'}", "seed=7"]
    assert main(["--config", str(path), "--no-wait", *overrides]) == 0, capsys.readouterr().err
    cfg = submitted[0].cfg
    assert (cfg.name, cfg.optim.lr, cfg.seed, cfg.loss.name) == ("mine", 0.00123, 7, "distarc")
    with pytest.raises(SystemExit):
        main(["--recipe", "mnist_distarc", "--config", str(path)])
    assert "not both" in capsys.readouterr().err
    assert main(["--config", str(path), "recipe=mnist_chest"]) == 2  # its advice must not be refused in turn
    assert "with --config FILE, the file is the recipe: edit it" in capsys.readouterr().err
    sweep_dir, cfgs = expand("", overrides, ["seed=0,1"], config=str(path))
    assert [c.name for c in cfgs] == ["seed=0", "seed=1"] and all(c.optim.lr == 0.00123 for c in cfgs)
    mine["slurm"]["time_min"] = 700  # what the command line's slurm.* would not change: the same folder
    path.write_text("# my notes\n" + yaml.safe_dump(mine, sort_keys=False))  # nor a comment
    assert expand("", overrides, ["seed=0,1"], config=str(path))[0] == sweep_dir
    to_dict = RunConfig.to_dict  # a key newer code adds (a default the file never named): the same folder
    monkeypatch.setattr(RunConfig, "to_dict", lambda self: {**to_dict(self), "added_later": 1})
    assert expand("", overrides, ["seed=0,1"], config=str(path))[0] == sweep_dir
    monkeypatch.undo()
    mine["optim"]["lr"] = 0.002  # another file of the same name: another sweep folder
    path.write_text(yaml.safe_dump(mine, sort_keys=False))
    assert expand("", overrides, ["seed=0,1"], config=str(path))[0] != sweep_dir
    with pytest.raises(ValueError, match="--config .* gives the base: sweep other keys"):
        expand("", overrides, ["recipe=mnist_distarc,mnist_chest"], config=str(path))
