"""gpudeck/protocol"""
