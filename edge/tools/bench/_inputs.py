"""The inputs: seeded pump rows, and JSON payloads made of them with a unique `asset` each."""

from __future__ import annotations

import random


def pump_rows(seed: int, n: int) -> list[tuple[float, float, float, float]]:
    """`n` measured pump rows (rms, kurtosis, temp_c, rpm): scripts/build_models.py's story, no numpy."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        condition = rng.random()
        rpm = rng.uniform(900, 3000)
        rms = 0.2 + 0.0007 * rpm * rng.uniform(0.4, 1.5) + abs(rng.gauss(0, 0.4))
        kurtosis = 3.0 + rng.gauss(0, 0.3) + abs(rng.gauss(0, 0.4))
        temp = 40 + 0.008 * rpm + rng.gauss(0, 6)
        if 0.70 <= condition < 0.88:  # a wearing bearing
            rms, kurtosis = rng.uniform(2.5, 7.5), rng.uniform(3.5, 10.0)
            temp += rng.uniform(0, 15)
        elif condition >= 0.88:  # severe: looseness or a hot bearing
            if rng.random() < 0.5:
                rms, kurtosis = rng.uniform(6.5, 11.5), rng.uniform(2.5, 8.0)
            else:
                temp = rng.uniform(85, 118)
        rows.append((
            round(max(rms, 0.1) * (1 + rng.gauss(0, 0.03)), 3),
            round(max(kurtosis, 1.5) + rng.gauss(0, 0.25), 3),
            round(temp + rng.gauss(0, 0.8), 2),
            round(rpm + rng.gauss(0, 5), 1),
        ))
    return rows


class Payloads:
    """Input payloads: a cycle of seeded rows, each input with a unique `asset` (its index)."""

    CYCLE = 4096

    def __init__(self, seed: int) -> None:
        self._prefixes = [
            b'{"rms":%.3f,"kurtosis":%.3f,"temp_c":%.2f,"rpm":%.1f,"asset":"' % row
            for row in pump_rows(seed, self.CYCLE)
        ]

    def __call__(self, index: int) -> bytes:
        return self._prefixes[index % self.CYCLE] + b'%d"}' % index
