"""spotdiff.report"""
