"""spotdiff.detect"""
