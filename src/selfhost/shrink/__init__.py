"""Shrinking a model beyond quantization: distillation, structured pruning, and one report for all.

distill.py trains a student on a teacher's soft targets (kd_loss.py, teacher.py,
teacher_cache.py) with train/'s loop; prune.py cuts layers, MLP channels and heads
chosen by importance.py and writes a smaller checkpoint of the same family;
report.py measures every variant side by side.
"""
