"""Print pass/fail/skip counts per backend from pytest JUnit XML reports.

A test's backend is the first parameter of its id when that names a backend (``test_x[mindspore-4-...]``);
everything else counts as framework-neutral.
"""

import collections
import sys
import xml.etree.ElementTree as ET

BACKENDS = ("torch_npu_logic_on_gloo", "torch", "mindspore")


def backend_of(name: str) -> str:
    if "[" in name:
        first = name.split("[", 1)[1].rstrip("]").split("-")[0]
        if first in BACKENDS:
            return first
    return "neutral"


def main(paths: list[str]) -> int:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for path in paths:
        for case in ET.parse(path).getroot().iter("testcase"):
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "failed"
                elif child.tag == "skipped":
                    outcome = "skipped"
            counts[backend_of(case.get("name", ""))][outcome] += 1
    print(f"\n{'backend':<26}{'passed':>8}{'failed':>8}{'skipped':>9}")
    for backend in sorted(counts):
        c = counts[backend]
        print(f"{backend:<26}{c['passed']:>8}{c['failed']:>8}{c['skipped']:>9}")
    total = sum(counts.values(), collections.Counter())
    print(f"{'total':<26}{total['passed']:>8}{total['failed']:>8}{total['skipped']:>9}\n")
    return 1 if total["failed"] or not total["passed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
