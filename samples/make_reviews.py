"""Make samples/reviews.jsonl and samples/reviews.parquet: 600 short synthetic product
reviews (deterministic: the same files on every run). Run: python samples/make_reviews.py"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

NUM_REVIEWS = 600
PRODUCTS = {
    "headphones": ["sound", "battery", "comfort", "noise cancelling", "price"],
    "coffee maker": ["taste", "noise", "cleaning", "price", "build quality"],
    "running shoes": ["fit", "cushioning", "durability", "price", "grip"],
    "laptop": ["screen", "battery", "keyboard", "speed", "price"],
    "backpack": ["straps", "zippers", "size", "material", "price"],
    "blender": ["power", "noise", "cleaning", "jar", "price"],
}
GOOD = ["is excellent", "works great", "is better than I expected", "is really nice",
        "is solid", "exceeded my expectations"]
BAD = ["is terrible", "stopped working after a week", "is disappointing", "feels cheap",
       "is much worse than advertised", "broke quickly"]
OPENERS = ["Bought this last month.", "Got it as a gift.", "Second one I own.",
           "Used it daily for a while.", "Ordered it on sale.", ""]


def make_review(rng: random.Random, index: int) -> dict:
    product = rng.choice(sorted(PRODUCTS))
    aspects = rng.sample(PRODUCTS[product], k=rng.randint(1, 2))
    rating = rng.randint(1, 5)
    sentences = [rng.choice(OPENERS)] if rng.random() < 0.6 else []
    for aspect in aspects:
        good = rng.random() < (rating - 0.5) / 5
        sentences.append(f"The {aspect} {rng.choice(GOOD if good else BAD)}.")
    if rating >= 4:
        sentences.append("Would recommend.")
    elif rating <= 2:
        sentences.append("Would not buy again.")
    return {"id": f"r{index:04d}", "product": product, "rating": rating,
            "review": " ".join(s for s in sentences if s)}


def main() -> None:
    rng = random.Random(1234)
    rows = [make_review(rng, i) for i in range(NUM_REVIEWS)]
    here = Path(__file__).parent
    with open(here / "reviews.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    pq.write_table(pa.Table.from_pylist(rows), here / "reviews.parquet", row_group_size=100)
    with open(here / "openai_batch.jsonl", "w", encoding="utf-8") as f:
        for row in rows[:20]:
            f.write(json.dumps({
                "custom_id": row["id"], "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "SmolLM2-135M-Instruct", "max_tokens": 32, "temperature": 0,
                         "messages": [
                             {"role": "system", "content": "You answer in one short sentence."},
                             {"role": "user", "content": f"Summarise this review: {row['review']}"},
                         ]}}) + "\n")
    print(f"wrote {NUM_REVIEWS} reviews to {here}/reviews.jsonl and reviews.parquet, "
          f"20 requests to {here}/openai_batch.jsonl")


if __name__ == "__main__":
    main()
