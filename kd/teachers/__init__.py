"""The teacher zoo: which teachers the configs know, which checkpoints exist, and training the missing ones.

    python -m kd.teachers                     # list them, with the command that trains the missing ones
    python -m kd.teachers.train -m experiment=resnet56_resnet20,wrn40_2_wrn16_2 hydra/launcher=slurm
"""
