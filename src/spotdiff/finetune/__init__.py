"""spotdiff.finetune"""
