from tokensift.scorers.question_selector.model import QuestionScorer, QuestionSelectorConfig, QuestionSelectorMethod

__all__ = ["QuestionScorer", "QuestionSelectorConfig", "QuestionSelectorMethod"]
