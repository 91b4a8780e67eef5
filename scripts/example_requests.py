"""Write manifests/examples/requests.jsonl: the embedded example batch (OpenAI Batch format).

Support tickets, made up here (seeded, so the file is reproducible), each asked one of three
things a support team batches overnight: route it (a word), summarise it (a sentence) or draft
a reply (a short paragraph). Run it from the repository root: python scripts/example_requests.py
"""

import json
import random
from pathlib import Path

COUNT = 240
MODEL = "smollm2-135m"
TOPICS = {
    "billing": [
        "I was charged twice for my March invoice",
        "my card was declined but the money left my account",
    ],
    "accounts": ["I cannot log in after resetting my password", "please delete my account and all my data"],
    "logistics": [
        "my parcel has said 'in transit' for nine days",
        "the box arrived crushed and one item is missing",
    ],
    "engineering": [
        "the export button does nothing in Firefox",
        "the mobile app crashes when I open settings",
    ],
}
MOODS = ["polite", "angry", "confused", "in a hurry"]
TASKS = [
    (
        "route",
        8,
        "Which team should handle this ticket: billing, accounts, logistics or engineering? One word.",
    ),
    ("summarise", 48, "Summarise this support ticket in one sentence."),
    ("reply", 256, "Write a short, friendly reply to this customer."),
]


def main() -> None:
    rng = random.Random(20261122)
    lines = []
    for number in range(1, COUNT + 1):
        topic = rng.choice(sorted(TOPICS))
        problem = rng.choice(TOPICS[topic])
        mood = rng.choice(MOODS)
        _, max_tokens, instruction = TASKS[number % len(TASKS)]
        ticket = f"Ticket {number} (customer is {mood}): {problem}. Order #{rng.randint(10_000, 99_999)}."
        lines.append(
            {
                "custom_id": f"ticket-{number:03d}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": MODEL,
                    "messages": [
                        {"role": "system", "content": "You are a support agent for an online shop."},
                        {"role": "user", "content": f"{instruction}\n\n{ticket}"},
                    ],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                },
            }
        )
    path = Path("manifests/examples/requests.jsonl")
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    print(f"{path}: {len(lines)} requests")


if __name__ == "__main__":
    main()
