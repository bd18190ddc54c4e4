"""A command agent for APO tests: reads $SYSTEM_PROMPT, prints {"answer", "reward"} (0.5 per key phrase)."""

import json
import os
import sys

prompt = os.environ.get("SYSTEM_PROMPT", "")
task = json.loads(sys.stdin.readline())
reward = 0.5 * ("step by step" in prompt) + 0.5 * ("final answer" in prompt.lower())
print(json.dumps({"answer": task["answer"] if reward == 1.0 else "unsure", "reward": reward}))
