"""Token ids shared by every part of the project (the released `vimpac/modeling_utils.py`).

Codes 0..8191 come from the tokenizer; the embedding table has 8197 rows so that the five
special ids of the released code fit after them.
"""

NUM_CODES = 8192
VOCAB_SIZE = NUM_CODES + 5  # rows of the token embedding and outputs of the MLM head
PAD_ID = 8193
MASK_ID = 8196
IGNORE_LABEL = -100  # label of positions that are not scored by the MLM loss
