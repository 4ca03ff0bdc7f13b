"""Losses: contrastive (plain), chunked ring contrastive, and the fusion tasks' classification/ITM/MLM losses."""
