"""The trainer: records → dataset → fine-tuned student adapter → the student server.

Modules follow the data: ``dataset`` (records to examples), ``collate`` (examples to tensors),
``finetune`` (the training run), ``registry`` (adapter versions), ``evaluate`` (offline scores),
``publish`` (adapters onto the student server), ``student_server`` (the embedded server).
"""
