"""Files in and out: checkpoint layouts and their key tables, loading into the core's MusicGen, audio files, click tracks."""
