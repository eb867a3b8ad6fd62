import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from aelab.bench import main, training_flops_per_sample
from aelab.model import Autoencoder


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_benchmark_times_all_three_pipelines_and_the_evaluation(data_dir, capsys, precision):
    main(
        [
            f"--data-dir={data_dir}",
            f"--precision={precision}",
            "--epochs=1",
            "--depths",
            "3",
            "--code-dim=8",
            "--override",
            "data.val_size=100",
            "data.batch_size=20",
            "data.eval_batch_size=50",
            "model.hidden_dims=[64,32]",
        ]
    )
    out = capsys.readouterr().out

    peak = {"32-true": "fp32", "bf16-mixed": "bf16"}[precision]
    assert f"precision {precision}:" in out and f"{peak} matmul peak" in out
    assert "depth 3: 104,960 linear weights, 300 samples per epoch" in out
    assert out.count("\n  1 ") == 1 and "\n  2 " not in out
    for line in ("project / plain", "median of the epochs' ratios", "tutorial / project"):
        assert line in out
    for line in ("train GFLOP/s", "% of matmul peak", "trainer.test"):
        assert line in out


def test_training_flops_are_those_the_step_actually_runs():
    model = Autoencoder(hidden_dims=[64, 32], code_dim=8)
    x = torch.rand(16, 784)
    with FlopCounterMode(display=False) as counter:
        F.mse_loss(model(x), x).backward()
    assert training_flops_per_sample(model) * len(x) == counter.get_total_flops()
