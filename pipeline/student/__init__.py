"""Stage two: the SASRec student, its training loop, the distillation objective, checkpoints, the teacher stream."""
