"""stage_min: MusicGen from scratch, turned into STAGE. Read the core first: model.py, delay.py, stage.py,
generate.py, text.py, codec.py, pipeline.py, songs.py (docs/architecture.md, docs/walkthrough.md).
"""
