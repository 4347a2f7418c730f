"""Every committed snapshot record file belongs to a test module that exists: records are found by
the module's path, so moving a test without its records turns its checks into "no record" failures."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECORDS = ROOT / "fixtures" / "snapshots"


def test_every_record_file_has_its_test_module():
    files = sorted(RECORDS.rglob("*.json"))
    assert files, f"no record files under {RECORDS}"
    orphans = [str(f.relative_to(RECORDS)) for f in files
               if not (ROOT / f.relative_to(RECORDS).with_suffix(".py")).is_file()]
    assert not orphans, (f"record files without their test module (move them with the test): {orphans}")
