"""spotdiff.pretrain"""
