"""The built-in bilingual corpus: an invented world of facts, written out as training text, held-out
prompts, chat data, preference pairs, multiple-choice benchmark files and a noisy raw folder.

Nothing is downloaded and everything is a pure function of `seed`. The world (`world.py`) holds 160
fictional facts about towns, people, animals and inventions, each with an English and a Chinese form.
`templates.py` phrases them, keeping some phrasings out of all training data so held-out prompts test
knowledge of the fact rather than recall of a string. Stages import from here:

- pretraining: `pretrain_texts`, `validation_texts`, `heldout_prompts`, `answer_matches`
- alignment: `sft_conversations`, `chat_eval_prompts`, `refusal_eval_prompts`, `preference_pairs`
- evaluation: `mcq_items`, `write_ceval`, `write_mmlu`, `write_cmmlu`, `mcq_practice_texts`
- data pipeline: `write_raw_corpus`
"""

from geb.corpus.chat import (chat_eval_prompts, is_refusal, preference_pairs, refusal_eval_prompts,
                             sft_conversations)
from geb.corpus.mcq import mcq_items, mcq_practice_texts, write_ceval, write_cmmlu, write_mmlu
from geb.corpus.raw import write_raw_corpus
from geb.corpus.texts import (answer_matches, heldout_prompts, normalize_answer, pretrain_texts,
                              validation_texts)
from geb.corpus.world import SUBJECTS, Fact, facts

__all__ = [
    "Fact", "SUBJECTS", "facts", "pretrain_texts", "validation_texts", "heldout_prompts", "answer_matches",
    "normalize_answer", "sft_conversations", "chat_eval_prompts", "refusal_eval_prompts", "is_refusal",
    "preference_pairs", "mcq_items", "mcq_practice_texts", "write_ceval", "write_mmlu", "write_cmmlu",
    "write_raw_corpus",
]
