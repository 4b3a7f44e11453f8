"""stage_min: MusicGen from scratch, turned into STAGE (stem accompaniment generation)."""
