"""Command lines: argparse front ends only."""
