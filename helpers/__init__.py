"""YOLOv3 from scratch on PASCAL VOC with PyTorch Lightning.

One concern per module (see README). The course's module names stay importable:
`from helpers import model, dataset, dataset_org, loss, utils`.
"""
