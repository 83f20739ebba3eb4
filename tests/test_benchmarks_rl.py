"""The RL benchmark scripts: ``benchmarks/policy_train_cost.py`` runs end to end on untrained demo-shaped models and
prints every trainer's row; ``benchmarks/rl_policies.py`` refuses without the demo backbones and reads das against
token pruning off a folded equal-FLOPs table correctly."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TRAINERS = (
    "MLLMScorerTrainer question_selector",
    "GRPOTrainer cacovid (G=8)",
    "ScorerTrainer dynamicvit, mask",
    "ScorerTrainer dynamicvit, removal (cached teacher)",
    "ReinforceTrainer ia_red2",
    "LayerSkipTrainer das (search phase)",
)


def run_script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(BENCHMARKS / name), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_policy_train_cost_prints_every_trainer(tmp_path):
    done = run_script("policy_train_cost.py", "--tiny", "--rounds", "1", "--warmup", "0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for trainer in TRAINERS:
        row = re.search(rf"^{re.escape(trainer)}\s+(\d+\.\d) ?(.*)$", done.stdout, re.MULTILINE)
        assert row is not None, f"no row for {trainer}:\n{done.stdout}"
        assert float(row.group(1)) > 0
    # each policy is set against its gradient-trained reference
    assert re.search(r"^GRPOTrainer .* x\d+\.\d\d vs MLLMScorerTrainer question_selector$", done.stdout, re.M)
    for policy in ("ReinforceTrainer ia_red2", "LayerSkipTrainer das"):
        line = next(line for line in done.stdout.splitlines() if line.startswith(policy))
        assert "vs ScorerTrainer dynamicvit, mask" in line and "vs ScorerTrainer dynamicvit, removal" in line
    assert not list(tmp_path.iterdir()), "the script wrote into its working directory"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_policy_train_cost_refuses_bad_rounds():
    with pytest.raises(ValueError, match="--rounds must be at least 1"):
        load("policy_train_cost").main(["--tiny", "--rounds", "0"])


def test_rl_policies_refuses_without_the_demo_backbones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main = load("rl_policies").main
    with pytest.raises(SystemExit) as refusal:
        main([])
    assert "runs/quickstart/backbone (run `make demo`" in str(refusal.value)
    assert "runs/vqa/llava (run `make demo-vqa`" in str(refusal.value)
    with pytest.raises(SystemExit, match="make demo`") as refusal:
        main(["--no-vqa"])
    assert "make demo-vqa" not in str(refusal.value)
    assert not (tmp_path / "runs").exists()


def test_das_against_token_pruning_at_equal_flops():
    seeds = {"mean": 0.8, "std": 0.01, "min": 0.79, "max": 0.81, "n": 3}
    matched = [
        {"method": "das (learned)", "kind": "learned", "flops_ratio": 0.8, "accuracy": seeds},
        {"method": "ia_red2 (learned)", "kind": "learned", "flops_ratio": 0.8, "accuracy": seeds | {"mean": 0.85}},
        {"method": "dynamicvit (learned)", "kind": "learned", "flops_ratio": 0.8, "accuracy": seeds | {"mean": 0.9}},
        {"method": "random", "kind": "training-free", "flops_ratio": 0.8, "accuracy": 0.7,
         "accuracy_low": 0.68, "accuracy_high": 0.72},
        {"method": "divprune", "kind": "training-free", "flops_ratio": 0.8, "accuracy": 0.75,
         "accuracy_low": 0.73, "accuracy_high": 0.77},
        {"method": "random", "kind": "training-free", "flops_ratio": 0.5, "accuracy": 0.6,
         "accuracy_low": 0.58, "accuracy_high": 0.62},
        {"method": "das (learned)", "kind": "learned", "flops_ratio": 0.4, "accuracy": None},
    ]  # fmt: skip
    table = load("rl_policies").skip_versus_tokens({"matched_flops": matched}).splitlines()
    assert len(table) == 4  # header, rule, FLOPs 0.5 and 0.8 (0.4 has no accuracy)
    assert table[2] == "| 0.5 | — | — | random 0.600 [0.580, 0.620] | — |"
    assert table[3] == (
        "| 0.8 | 0.800 ± 0.010 (3 seeds) | dynamicvit (learned) 0.900 ± 0.010 (3 seeds) "
        "| divprune 0.750 [0.730, 0.770] | +0.050 |"
    )
