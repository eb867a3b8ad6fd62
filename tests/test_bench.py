from aelab.bench import main


def test_benchmark_times_all_three_pipelines_and_the_evaluation(data_dir, capsys):
    main(
        [
            f"--data-dir={data_dir}",
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

    assert "fp32 matmul peak" in out
    assert "depth 3: 104,960 linear weights, 300 samples per epoch" in out
    assert out.count("\n  1 ") == 1 and "\n  2 " not in out
    for line in ("project / plain", "tutorial / project", "train GFLOP/s", "trainer.test"):
        assert line in out
