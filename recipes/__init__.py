"""Hydra recipes composed on verl's ppo_trainer (shipped as package data)."""
