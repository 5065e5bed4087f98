"""Vectors for scripts/bench-search.sh, and the recall of search results against exact search.

  search-vectors.py generate DIR ROWS QUERIES DIM [SHARED]
                                                    base.npy, queries.npy, truth.npy (exact top 100
                                                    by inner product) and base.copy (PostgreSQL
                                                    binary COPY of (id int, e vector(DIM)))
  search-vectors.py recall DIR RESULTS K            mean recall@K of RESULTS (lines "query_id
                                                    id,id,..." in rank order) against truth.npy,
                                                    over the queries RESULTS has

The distribution imitates what is known of decoder-model embeddings, so that binary quantization
meets what it meets there:
- a shared direction: such embeddings lie in a narrow cone (Ethayarajh 2019; Gao et al. 2019,
  "representation degeneration"); here every vector has ~0.75 of its length along one direction,
  so two unrelated vectors have cosine ~0.55 (SHARED, default 0.75; 1.6 gives ~0.85);
- uneven dimensions: a few dimensions vary far more than the rest ("rogue dimensions", Timkey &
  van Schijndel 2021): every component's spread is scaled by a log-normal factor;
- topics within topics: 200 topics of 10 subtopics each, so that a query's nearest rows are
  graded (same subtopic, same topic, the rest) rather than equidistant.
Queries come from the same process (their own noise), as texts about the corpus's topics do.
Seeded: the same arguments give the same vectors.
"""
import struct
import sys
from pathlib import Path

import numpy as np

TOPICS, SUBTOPICS = 200, 10
SHARED, TOPIC, SUBTOPIC, NOISE = 0.75, 0.40, 0.35, 0.40
CHUNK = 5000


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def sample(rng, n, parts, weight):
    shared, spread, topics, subtopics = parts
    leaf = rng.integers(0, TOPICS * SUBTOPICS, n)
    noise = unit(rng.standard_normal((n, len(shared)), dtype=np.float32) * spread)
    x = weight * shared + TOPIC * topics[leaf // SUBTOPICS] + SUBTOPIC * subtopics[leaf] + NOISE * noise
    return unit(x).astype(np.float32)


def generate(out, rows, queries, dim, weight):
    rng = np.random.default_rng(20261203)
    spread = np.exp(rng.normal(0.0, 0.5, dim)).astype(np.float32)
    shared = unit(rng.standard_normal(dim).astype(np.float32))
    topics = unit(rng.standard_normal((TOPICS, dim), dtype=np.float32) * spread)
    subtopics = unit(rng.standard_normal((TOPICS * SUBTOPICS, dim), dtype=np.float32) * spread)
    parts = (shared, spread, topics, subtopics)
    base = np.concatenate([sample(rng, min(CHUNK, rows - i), parts, weight) for i in range(0, rows, CHUNK)])
    query = sample(rng, queries, parts, weight)
    np.save(out / "base.npy", base)
    np.save(out / "queries.npy", query)
    scores = query @ base.T
    truth = np.argsort(-scores, axis=1)[:, :100] + 1  # ids start at 1
    np.save(out / "truth.npy", truth)
    with open(out / "base.copy", "wb") as f:
        f.write(b"PGCOPY\n\xff\r\n\0" + struct.pack("!ii", 0, 0))
        row_header = struct.pack("!h", 2)
        for i, v in enumerate(base):
            # (id int4, e vector): a vector is int16 dim, int16 unused, then big-endian float4s.
            f.write(row_header + struct.pack("!ii", 4, i + 1) + struct.pack("!ihh", 4 + 4 * dim, dim, 0))
            f.write(v.astype(">f4").tobytes())
        f.write(struct.pack("!h", -1))
    mean_cos = float(np.mean((base[:2000] @ base[2000:4000].T)))
    print(f"{rows} vectors of {dim} dims, {queries} queries; mean cosine of unrelated rows {mean_cos:.2f}")


def recall(out, results, k):
    truth = np.load(out / "truth.npy")
    got = {}
    for line in Path(results).read_text().splitlines():
        qid, ids = line.split(" ", 1) if " " in line else (line, "")
        got[int(qid)] = [int(x) for x in ids.split(",") if x][:k]
    found = [len(set(ids) & set(truth[q - 1, :k])) / k for q, ids in got.items()]
    print(f"{np.mean(found):.3f}")


if __name__ == "__main__":
    command, out = sys.argv[1], Path(sys.argv[2])
    if command == "generate":
        generate(out, int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]) if len(sys.argv) > 6 else SHARED)
    else:
        recall(out, sys.argv[3], int(sys.argv[4]))
