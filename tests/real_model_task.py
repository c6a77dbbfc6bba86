"""A task for tests/test_real_model.py: GSM8K prompts (real chat template, real tokenizer) with a
reward that differs between the samples of a group even for a random model, so every GRPO step
trains (GSM8K's own reward is 0 for all of them, and a step with equal rewards trains nothing)."""
from nanogrpo.tasks import load_task


def make_task(data=None, seed=0):
    task = load_task("gsm8k", data, seed=seed, num_test=4)

    def score(text: str, example: dict) -> dict:
        total = (sum(map(ord, text)) % 5) / 4  # any deterministic function of the text that varies
        return {"format": 0.0, "answer": 0.0, "total": total}

    task.score = score
    task.max_new_tokens = 12
    return task
