"""clip-index's command line without Ray: mistakes are one line and exit 2, the settings follow the
convention, and the serving install stays without Ray."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from clipserve.index.cli import main
from clipserve.index.sources import list_source

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([], "--source is required"),
        (["photos"], "--model is required"),
        (["photos", "--model", "tiny"], "say where the vectors go"),
        (["photos", "--model", "tiny", "--server", "http://127.0.0.1:1"], "add --collection NAME"),
        (
            ["photos", "--model", "tiny", "--collection", "c"],
            "--collection needs --server URL or --postgres-dsn",
        ),
        (["photos", "--model", "tiny", "--output", "out", "--shard-size", "0"], "--shard-size"),
        (["photos", "--model", "tiny", "--output", "out", "--gpu", "maybe"], "--gpu"),
    ],
)
def test_mistakes_are_one_line(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("clip-index: error: ") and says in err and err.count("\n") == 1, err


def test_a_missing_source_or_model_is_one_line(tiny_repo, tmp_path, capsys) -> None:
    assert (
        main(
            [
                str(tmp_path / "nowhere"),
                "--model",
                "tiny",
                "--models-dir",
                str(tiny_repo),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "a.png").write_bytes(b"x")
    assert (
        main(
            [
                str(tmp_path),
                "--model",
                "nosuch",
                "--models-dir",
                str(tiny_repo),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("clip-index: error: ") and "nosuch" in err and err.count("\n") == 1, err


def test_sources_list_in_a_stable_order_with_stable_ids(tmp_path) -> None:
    for name in ("b.png", "a/c.jpg", "a/c.txt", "z.gif", "readme.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("caption" if name.endswith(".txt") else "x")
    listing = list_source(str(tmp_path))
    assert [item.id for item in listing.items] == ["a/c.jpg", "b.png", "z.gif"]
    assert listing.items[0].text == "caption" and listing.items[0].metadata == {
        "path": "a/c.jpg",
        "caption": "caption",
    }
    assert listing.fingerprint() == list_source(str(tmp_path)).fingerprint()


def test_the_serving_install_needs_no_ray() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    serving = " ".join(extras["serve"] + extras["serve-core"])
    assert "ray" not in serving.lower() and any(r.startswith("ray[data]==") for r in extras["index"])
