"""The cost-vs-accuracy plot's arithmetic: the Pareto frontier and labels that would overlap."""
from hybridserve.eval.plots import cost_vs_accuracy, label_groups, pareto


def test_pareto_keeps_only_undominated_points():
    pts = [("cheap-bad", 1.0, 0.1), ("mid", 2.0, 0.5), ("dominated", 3.0, 0.4), ("best", 4.0, 0.9),
           ("tie-cost-worse", 2.0, 0.3)]
    assert [p[0] for p in pareto(pts)] == ["cheap-bad", "mid", "best"]


def test_close_points_share_one_label_far_ones_do_not():
    pts = [("a", 1.00e-4, 0.0), ("b", 1.01e-4, 0.004), ("c", 4.0e-4, 0.44), ("d", 1.0e-4, 0.49)]
    groups = label_groups(pts)
    assert sorted(groups.values()) == [["a", "b"], ["c"], ["d"]]


def test_plot_is_written(tmp_path):
    rows = [{"target": "x", "tag": "all", "usd_per_request": 1e-4, "accuracy": 0.5},
            {"target": "y", "tag": "all", "usd_per_request": 2e-4, "accuracy": 0.7},
            {"target": "y", "tag": "facts", "usd_per_request": 2e-4, "accuracy": 0.9}]
    path = tmp_path / "c.png"
    assert cost_vs_accuracy(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
