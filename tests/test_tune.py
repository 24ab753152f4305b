"""`colo-proxy tune` on two real-server golden pairs with a 16-setting grid.

The table has a row per setting, the written TOML is accepted by `replay --config`
and replaying with it gives the chosen row's figures, and the plot is a real PNG.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from colo_proxy import tune
from colo_proxy.cli import main
from colo_proxy.drivers.pcap import read_frames

PCAPS = Path(__file__).resolve().parents[1] / "pcaps"
PAIRS = ["nginx-date", "redis-time"]
GRID = ["--grid", "min_checkpoint_interval=0,0.1,0.5,1", "--grid", "compare_timeout=0.5,3",
        "--grid", "secondary_after_checkpoint=continues,auto"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("tune")
    argv = ["tune", *(str(PCAPS / p) for p in PAIRS), *GRID, "--jobs", "2",
            "--out", str(out / "best.toml"), "--json", str(out / "rows.json"),
            "--plot", str(out / "plot.png")]
    assert main(argv) == 0
    return {"dir": out, **json.loads((out / "rows.json").read_text())}


def test_a_row_per_setting_and_a_front(tuned: dict[str, Any],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    rows = tuned["rows"]
    assert len(rows) == 16
    assert {r["setting"]["min_checkpoint_interval"] for r in rows} == {0, 0.1, 0.5, 1}
    front = [rows[i - 1] for i in tuned["pareto"]]
    assert tuned["chosen"] in tuned["pareto"]
    for r in rows:  # nothing off the front beats a front row on both axes
        for f in front:
            assert not (r["checkpoints_per_second"] < f["checkpoints_per_second"]
                        and r["added_latency"]["p99"] < f["added_latency"]["p99"])
    # the rate limit trades checkpoints for latency: the slowest rate has fewer checkpoints
    by_rate = {r["setting"]["min_checkpoint_interval"]: r for r in rows
               if r["setting"]["compare_timeout"] == 3
               and r["setting"]["secondary_after_checkpoint"] == "continues"}
    assert by_rate[1]["checkpoints_per_second"] < by_rate[0]["checkpoints_per_second"]
    assert by_rate[1]["added_latency"]["p99"] > by_rate[0]["added_latency"]["p99"]


def test_written_toml_replays_to_the_chosen_row(tuned: dict[str, Any], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    best = tuned["dir"] / "best.toml"
    chosen = tuned["rows"][tuned["chosen"] - 1]
    assert tomllib.loads(best.read_text()) == chosen["setting"]
    parts = []
    for name in PAIRS:
        d = PCAPS / name
        args = json.loads((d / "expected.json").read_text())["args"]
        guest = ["--guest", args[args.index("--guest") + 1]]
        released = tmp_path / f"{name}.pcap"
        capsys.readouterr()
        assert main(["replay", str(d / "primary.pcap"), str(d / "secondary.pcap"), "--json",
                     "--config", str(best), "--released", str(released), *guest]) == 0
        report = json.loads(capsys.readouterr().out)
        lat, held = tune.latencies(str(d / "primary.pcap"), read_frames(released))
        parts.append(tune.pair_figures(report, lat, held))
    again = tune.row_of(chosen["setting"], parts)
    for key in ("checkpoints_per_second_by_reason", "bytes_held", "divergences", "mc_time"):
        assert again[key] == pytest.approx(chosen[key]), key
    for q in ("p50", "p99", "max"):
        assert again["added_latency"][q] == pytest.approx(chosen["added_latency"][q], abs=1e-6)


def test_plot_is_a_real_picture(tuned: dict[str, Any]) -> None:
    import matplotlib.image

    img = matplotlib.image.imread(tuned["dir"] / "plot.png")
    assert img.shape[0] >= 400 and img.shape[1] >= 600
    assert float(img[..., :3].std()) > 0.05  # not blank


def test_grid_flags_and_file(tmp_path: Path) -> None:
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text("[tune]\ncompare_timeout = [1, 2]\nmax_hold_frames = 100\n")
    grid = tune.parse_grid(["min-checkpoint-interval=0.1,0.2"], str(grid_file))
    assert grid == {"compare_timeout": [1, 2], "max_hold_frames": [100],
                    "min_checkpoint_interval": [0.1, 0.2]}
    assert len(tune.settings_of(grid)) == 4
    with pytest.raises(Exception, match="not a setting"):
        tune.parse_grid(["no_such_field=1"], None)


def test_pareto_and_choice() -> None:
    def row(c: float, p99: float) -> dict[str, Any]:
        return {"checkpoints_per_second": c, "added_latency": {"p99": p99}}

    rows = [row(5, 0.001), row(1, 0.5), row(2, 0.1), row(3, 0.2), row(5, 0.002)]
    assert tune.pareto(rows) == [0, 1, 2]
    assert tune.choose(rows, [0, 1, 2], max_latency=0.15) == 2
    assert tune.choose(rows, [0, 1, 2], max_latency=0.0001) in (0, 1, 2)


def test_grid_file_over_list_fields(tmp_path: Path) -> None:
    """Any Config field, masks (a list of tables) included, through a TOML grid."""
    grid = tmp_path / "grid.toml"
    grid.write_text("[tune]\npolicy = ['colo', 'hybrid']\n"
                    "masks = [[], [{pattern = '\\r\\nDate: ([^\\r\\n]*)', port = 80, "
                    "protocol = 'tcp'}]]\n")
    out = tmp_path / "best.toml"
    rows_json = tmp_path / "rows.json"
    assert main(["tune", str(PCAPS / "nginx-date"), "--grid-file", str(grid), "--jobs", "2",
                 "--out", str(out), "--json", str(rows_json)]) == 0
    rows = json.loads(rows_json.read_text())["rows"]
    masked = [r for r in rows if r["setting"]["masks"]]
    plain = [r for r in rows if not r["setting"]["masks"]]
    assert len(masked) == len(plain) == 2
    assert all(r["divergences"] == 0 and r["checkpoints_per_second"] == 0 for r in masked)
    assert all(r["divergences"] > 0 for r in plain)
    assert tomllib.loads(out.read_text())["masks"] == [
        {"pattern": r"\r\nDate: ([^\r\n]*)", "port": 80, "protocol": "tcp"}]
