"""Fine-tuning into STAGE: options, stems datasets and windows, batches, checkpoints, beats, captions, augmentation."""
