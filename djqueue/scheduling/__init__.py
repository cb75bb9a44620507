"""Crontabs from settings: ``DJQUEUE["CRONTABS"]``, fired by ``manage.py runscheduler``.

crontab.py is the pure part (entries and fire times); scheduler.py is the loop (I/O).
"""
