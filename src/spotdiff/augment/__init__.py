"""spotdiff.augment"""
