"""Result files and the report over them, shared by the simulator and the live replay."""
