"""Verifiable reward functions for PPO (`ppo.reward_function: examples/ppo_rewards.py:NAME`).

Each is called as fn(prompts, completions, completion_ids, ended, messages) with one entry per sampled answer:
the user's last message, the answer's text (its end-of-turn token included when it stopped on its own), its
token ids, whether it stopped on its own, and the whole prompt as chat messages. It returns one float per answer.
"""

import re


def mentions_hacking(prompts, completions, **info):
    """1 when the answer puts the term in its hacker context (mentions hack, hacker, hacking...), else 0."""
    return [1.0 if re.search(r"\bhack", text, re.IGNORECASE) else 0.0 for text in completions]


def concise(prompts, completions, completion_ids, ended, **info):
    """1 for an answer that ends on its own within 40 tokens, less 0.01 per token; 0 for one cut off."""
    return [1.0 - 0.01 * len(ids) if done and len(ids) <= 40 else 0.0 for ids, done in zip(completion_ids, ended)]
