"""The shipped DeepSpeed JSON files build the engine we document: torch's fused AdamW on GPU
(no CUDA op to JIT-build at start on every node), which takes a step under ZeRO-1/2/3."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, cpu_env

SCRIPT = r'''
import json, sys, torch, deepspeed
from mto_ds.engine.distributed import init_distributed
init_distributed()
for name in sys.argv[1:]:
    ds = json.load(open(f"ds_configs/{name}.json"))
    ds.update(train_batch_size=2, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    ds["optimizer"]["params"]["lr"] = 0.1
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    before = model.weight.detach().clone()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    loss = engine(torch.ones(2, 4, dtype=torch.bfloat16)).float().pow(2).sum()
    engine.backward(loss)
    engine.step()
    opt = engine.basic_optimizer
    with deepspeed.zero.GatheredParameters([engine.module.weight]):
        moved = (engine.module.weight.detach().float() - before).abs().max().item()
    print("RESULT", json.dumps({"config": name, "optimizer": type(opt).__module__ + "." + type(opt).__name__,
                                "fused": opt.defaults.get("fused"), "moved": moved}), flush=True)
'''

GPU_BF16 = ["zero1_bf16", "zero2_bf16", "zero3_bf16"]


def test_gpu_configs_use_torch_fused_adamw_and_step(tmp_path):
    script = tmp_path / "build_engines.py"
    script.write_text(SCRIPT)
    result = subprocess.run([sys.executable, str(script), *GPU_BF16], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env=cpu_env(PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("RESULT")]
    assert [r["config"] for r in rows] == GPU_BF16
    for row in rows:
        assert row["optimizer"] == "torch.optim.adamw.AdamW" and row["fused"] is True, row
        assert row["moved"] > 0.01, row  # lr 0.1: the optimizer stepped the (gathered) weight


@pytest.mark.parametrize("name", ["zero2_fp16"])
def test_fp16_config_names_the_same_optimizer(name):
    """fp16 cannot run on the CPU accelerator; its optimizer section must match the bf16 ones."""
    sections = {n: json.loads((REPO / "ds_configs" / f"{n}.json").read_text())["optimizer"]
                for n in (name, "zero2_bf16")}
    assert sections[name] == sections["zero2_bf16"]
